"""Pure index functions: window layout, Table 8 masks, positions, placements."""

import pytest
import torch

from casa.fusion.casa import fused_block_indices
from casa.fusion.windows import build_window_index, casa_kv_rows, table8_masked_key, window_layout
from casa.positions import insertion_layout, insertion_positions, window_image_positions


def _layout_is_cat_and_gather(index, N: int, T: int, expected: list[int]) -> torch.Tensor:
    """window_layout == cat([image, text])[expected], values and gradients -> the text's gradient."""
    img = torch.randn(N, 2, 3, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(T, 2, 3, dtype=torch.float64, requires_grad=True)
    out = window_layout(img, txt, index)
    ref = torch.cat([img, txt])[torch.tensor(expected)]
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (img, txt), g), torch.autograd.grad(ref, (img, txt), g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    return got[1]


def test_casa_kv_layout_matches_a_naive_loop():
    # windows:  (t t | -)  (t t t | I I I I)  (t t | I I)  (t | I I I)
    cu_t = torch.tensor([0, 2, 5, 7, 8], dtype=torch.int32)
    cu_i = torch.tensor([0, 0, 4, 6, 9], dtype=torch.int32)
    N, T = 9, 8
    expected = []
    for w in range(4):
        expected += list(range(cu_i[w], cu_i[w + 1]))  # image keys of the window (source 0..N-1)
        expected += [N + p for p in range(cu_t[w], cu_t[w + 1])]  # then its text (source N..N+T-1)
    cu_k, (rows_img, rows_txt, K) = casa_kv_rows(cu_t, cu_i)
    assert K == N + T and cu_k.tolist() == [0, 2, 9, 13, 17]
    placed = torch.empty(N + T, dtype=torch.long)
    placed[torch.cat([rows_img, rows_txt])] = torch.arange(N + T)
    assert placed.tolist() == expected
    # keys laid out as:  t t | I I I I t t t | I I t t | I I I t
    index = build_window_index("casa", cu_t, cu_i, torch.zeros(N, 4), torch.zeros(N, 4))
    assert index.cu_k.tolist() == [0, 2, 9, 13, 17] and index.causal
    _layout_is_cat_and_gather(index, N, T, expected)


def test_eq3_indicator_gives_a_window_without_image_no_key():
    """Paper eq. 3's 1[i > K] (CASA⊕/→): the text before a sample's first image has no key, so
    its queries get no update. The other windows' keys are those without the indicator.

        windows:  (t t | -)  (t t t | I I I I)  (t | -)  (t | I I)      [sample 0 | sample 1]
        keys:     (none)     I I I I t t t      (none)   I I t
    """
    cu_t = torch.tensor([0, 2, 5, 6, 7], dtype=torch.int32)
    cu_i = torch.tensor([0, 0, 4, 4, 6], dtype=torch.int32)
    N, T = 6, 7
    cu_k, (rows_img, rows_txt, K) = casa_kv_rows(cu_t, cu_i, indicator=True)
    assert cu_k.tolist() == [0, 0, 7, 7, 10] and K == 10
    expected = list(range(0, 4)) + [N + p for p in (2, 3, 4)] + [4, 5] + [N + 6]  # sources of keys 0..K-1
    assert rows_txt.tolist() == [K, K, 4, 5, 6, K, 9]  # K: no key
    index = build_window_index("casa", cu_t, cu_i, torch.zeros(N, 4), torch.zeros(N, 4), indicator=True)
    assert index.cu_k.tolist() == [0, 0, 7, 7, 10]
    txt = torch.randn(T, 2, 3, dtype=torch.float64)
    grad_txt = _layout_is_cat_and_gather(index, N, T, expected)
    assert not grad_txt[[0, 1, 5]].any()  # a text token that is no key gets no gradient through the keys
    # no image anywhere: no key at all
    none = build_window_index("casa", cu_t[:2], cu_i[:2] * 0, torch.zeros(0, 4), torch.zeros(0, 4), indicator=True)
    empty = window_layout(torch.zeros(0, 2, 3, dtype=torch.float64), txt[:2], none)
    assert empty.shape == (0, 2, 3) and none.cu_k.tolist() == [0, 0]
    # Table 8 masks never point at a key of another window
    for mode in ("self", "rnd", "rnd_txt"):
        masked = table8_masked_key(index, mode, torch.Generator().manual_seed(0)).tolist()
        assert [masked[p] for p in (0, 1, 5)] == [-1, -1, -1]
    assert table8_masked_key(index, "self").tolist() == [-1, -1, 4, 5, 6, -1, 9]


def test_table8_masks():
    # one window: 2 image keys then 3 text keys; queries are the 3 text tokens
    #            keys: I0 I1 t0 t1 t2
    #   self   : t0 -> t0 (key 2), t1 -> key 3, t2 -> key 4
    #   rnd    : a key in [0, self)
    #   rnd_txt: a text key in [2, self), none for t0
    cu_t = torch.tensor([0, 3], dtype=torch.int32)
    cu_i = torch.tensor([0, 2], dtype=torch.int32)
    index = build_window_index("casa", cu_t, cu_i, torch.zeros(2, 4), torch.zeros(2, 4))
    assert table8_masked_key(index, "self").tolist() == [2, 3, 4]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rnd = table8_masked_key(index, "rnd", g).tolist()
        assert 0 <= rnd[0] < 2 and 0 <= rnd[1] < 3 and 0 <= rnd[2] < 4
        txt = table8_masked_key(index, "rnd_txt", g).tolist()
        assert txt[0] == -1 and txt[1] == 2 and txt[2] in (2, 3)
    with pytest.raises(ValueError, match="inference_mask='all' is not one of"):
        table8_masked_key(index, "all")


def test_insertion_layout_and_positions():
    # sample 0: t t [I I I] t t     sample 1: [I I] t t t
    sample_cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    img_pos = torch.tensor([2, 4])
    counts = torch.tensor([3, 2])
    text_dst, image_dst, merged_cu = insertion_layout(sample_cu, img_pos, counts)
    # merged: t t I I I t t | I I t t t
    assert text_dst.tolist() == [0, 1, 5, 6, 9, 10, 11]
    assert image_dst.tolist() == [2, 3, 4, 7, 8]
    assert merged_cu.tolist() == [0, 7, 12]
    grid = torch.tensor([[1, 2, 6], [1, 2, 4]])  # 3 and 2 tokens after the 2x2 merge
    pos_ids = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    text_pos, image_pos = insertion_positions(pos_ids, sample_cu, img_pos, grid, 2, mrope=False)
    assert text_pos.tolist() == [0, 1, 5, 6, 2, 3, 4]
    assert image_pos.tolist() == [2, 3, 4, 0, 1]
    # M-RoPE: image 0 is a 1x3 merged grid starting at 2 -> (2,2,2),(2,2,3),(2,2,4); advances max(1,3)=3
    text_pos, image_pos = insertion_positions(pos_ids, sample_cu, img_pos, grid, 2, mrope=True)
    assert text_pos[0].tolist() == [0, 1, 5, 6, 2, 3, 4] and (text_pos == text_pos[0]).all()
    assert image_pos[:, :3].T.tolist() == [[2, 2, 2], [2, 2, 3], [2, 2, 4]]
    assert image_pos[:, 3:].T.tolist() == [[0, 0, 0], [0, 0, 1]]


def test_window_image_positions_end_before_the_window():
    # one sample: t t t [I I I] t t ; text positions 0..4, the image window starts at text 3
    pos_ids = torch.arange(5)
    cu_t = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_i = torch.tensor([0, 0, 3], dtype=torch.int32)
    grid = torch.tensor([[1, 2, 6]])
    assert window_image_positions(pos_ids, cu_t, cu_i, grid, 2, mrope=False).tolist() == [0, 1, 2]
    mpos = window_image_positions(pos_ids, cu_t, cu_i, grid, 2, mrope=True)
    assert mpos.T.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2]]


def test_placements():
    assert fused_block_indices("every_k", 2, 6) == [0, 2, 4]
    assert fused_block_indices("first_k", 2, 6) == [0, 1]
    assert fused_block_indices("first_last_k", 2, 6) == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="CASA.k=0 must be between 1 and"):
        fused_block_indices("every_k", 0, 6)
