"""The one window rule (`casa.batch.window_boundaries`), the one builder (`build_batch`) and
the one `image_token_count`, against hand-drawn cases."""

import pytest
import torch

from casa.batch import (build_batch, collate_packed, continues_open_window, image_token_count, seqlens_of,
                        window_boundaries, window_samples)
from casa.assistant import frame_chunk
from casa.generation import append_tokens, image_chunk, text_chunk, truncate_samples
from casa.tiny import random_packed_batch


def test_the_packed_batch_docstring_example():
    #   sample 0:  t t [I I I I] t t t         sample 1: [I I] t t [I I I] t
    #   windows    (t t | -) (t t t | IIII)              (t t | II) (t | III)
    assert window_boundaries([0, 5, 8], [2, 5, 7], [4, 2, 3]) == ([0, 2, 5, 7, 8], [0, 0, 4, 6, 9])
    # tensors in, host lists out
    got = window_boundaries(torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor([2, 5, 7]), torch.tensor([4, 2, 3]))
    assert got == ([0, 2, 5, 7, 8], [0, 0, 4, 6, 9])


def test_consecutive_images_form_one_window():
    #   t t [I I][I I I] t t      -> (t t | -)(t t | I I I I I)
    assert window_boundaries([0, 4], [2, 2], [2, 3]) == ([0, 2, 4], [0, 0, 5])
    #   [I][I] t t t [I] t        -> (t t t | I I)(t | I)
    assert window_boundaries([0, 4], [0, 0, 3], [1, 1, 1]) == ([0, 3, 4], [0, 2, 3])


def test_text_before_the_first_image_is_a_window_without_image():
    #   t t t [I I] t             -> (t t t | -)(t | I I)
    assert window_boundaries([0, 4], [3], [2]) == ([0, 3, 4], [0, 0, 2])
    #   t t t t (no image)        -> (t t t t | -);  two text-only samples: one window each
    assert window_boundaries([0, 4], [], []) == ([0, 4], [0, 0])
    assert window_boundaries([0, 4, 6], [], []) == ([0, 4, 6], [0, 0, 0])
    # no sample at all
    assert window_boundaries([0], [], []) == ([0], [0])


def test_an_image_at_the_very_end_closes_the_last_sample_with_a_window_without_text():
    #   t t [I] t | t t [I I]     -> (t t | -)(t | I) | (t t | -)( - | I I)
    assert window_boundaries([0, 3, 5], [2, 5], [1, 2]) == ([0, 2, 3, 5, 5], [0, 0, 1, 1, 3])
    # an image at a sample boundary precedes the next sample's text: it opens that sample
    #   t t t | [I] t t           -> (t t t | -) | (t t | I)
    assert window_boundaries([0, 3, 5], [3], [1]) == ([0, 3, 5], [0, 0, 1])


def test_the_rule_rejects_unsorted_or_out_of_range_images_naming_them():
    with pytest.raises(ValueError, match="sorted"):
        window_boundaries([0, 3, 6], [4, 1], [1, 1])
    with pytest.raises(ValueError, match="past the text"):
        window_boundaries([0, 3], [4], [1])
    with pytest.raises(ValueError, match="2 image positions but 1 image token counts"):
        window_boundaries([0, 3], [1, 2], [1])


def test_window_samples_and_which_windows_continue_an_open_window():
    # chunk of two cached samples: sample 0 = text then a frame; sample 1 = text only
    #   t t [I] t | t t           windows (t t | -)(t | I) | (t t | -)
    cu_t, cu_i = window_boundaries([0, 3, 5], [2], [1])
    assert window_samples([0, 3, 5], cu_t) == ([0, 0, 1], [True, False, True])
    assert continues_open_window([0, 3, 5], cu_t, cu_i) == [True, False, True]
    # a chunk starting with an image opens a new window
    cu_t, cu_i = window_boundaries([0, 2], [0], [1])
    assert continues_open_window([0, 2], cu_t, cu_i) == [False]


def test_image_token_count_tensor_and_int_forms():
    grids = [[1, 4, 4], [2, 2, 6], [1, 2, 2]]
    assert image_token_count(grids, 2) == [4, 6, 1]
    t = image_token_count(torch.tensor(grids), 2)
    assert t.dtype == torch.int64 and t.tolist() == [4, 6, 1]
    assert image_token_count(grids, 1) == [16, 24, 4]
    assert image_token_count([], 2) == [] and image_token_count(torch.zeros(0, 3, dtype=torch.long), 2).numel() == 0


def test_build_batch_derives_the_windows_and_the_host_max_lengths():
    b = build_batch(list(range(8)), [0, 5, 8], pixel_values=torch.zeros(36, 4),
                    image_grid_thw=[[1, 4, 4], [1, 2, 4], [1, 2, 6]], image_text_position=[2, 5, 7], merge=2)
    b.validate()
    assert b.window_cu_seqlens_text.tolist() == [0, 2, 5, 7, 8]
    assert b.window_cu_seqlens_image.tolist() == [0, 0, 4, 6, 9]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]  # restarting per sample
    assert b.labels.tolist() == [-100] * 8
    assert b.seqlens == seqlens_of([0, 5, 8], [0, 2, 5, 7, 8], [0, 0, 4, 6, 9])
    assert b.sample_cu_seqlens.dtype == b.window_cu_seqlens_text.dtype == torch.int32


LAYOUTS = [
    [[("text", 5), ("image", (4, 4)), ("text", 7)], [("image", (2, 4)), ("text", 6), ("image", (2, 2)), ("text", 3)]],
    [[("text", 3), ("image", (2, 2)), ("image", (2, 4)), ("text", 4)], [("text", 6)], [("image", (4, 2)), ("text", 2)]],
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_collate_keeps_the_rule_on_the_concatenated_samples(layout):
    b = random_packed_batch(layout)
    counts = image_token_count(b.image_grid_thw, 2)
    want = window_boundaries(b.sample_cu_seqlens, b.image_text_position, counts)
    assert (b.window_cu_seqlens_text.tolist(), b.window_cu_seqlens_image.tolist()) == want
    assert b.seqlens == seqlens_of(b.sample_cu_seqlens.tolist(), *want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generation_batches_follow_the_rule(layout):
    b = random_packed_batch(layout)
    cu = b.sample_cu_seqlens.tolist()
    for out in (append_tokens(b, [[1, 2]] * b.num_samples),
                truncate_samples(b, [max(1, (cu[s + 1] - cu[s]) // 2) for s in range(b.num_samples)])):
        out.validate()
        want = window_boundaries(out.sample_cu_seqlens, out.image_text_position, image_token_count(out.image_grid_thw, 2))
        assert (out.window_cu_seqlens_text.tolist(), out.window_cu_seqlens_image.tolist()) == want
        assert out.seqlens == seqlens_of(out.sample_cu_seqlens.tolist(), *want)
    grows = append_tokens(b, [[1, 2]] * b.num_samples)
    assert grows.window_cu_seqlens_image.tolist() == b.window_cu_seqlens_image.tolist()  # the last windows grow
    assert grows.window_cu_seqlens_text[-1] == b.num_text_tokens + 2 * b.num_samples


def test_chunks_follow_the_rule():
    t = text_chunk([[1, 2, 3], [4]], patch_dim=4)
    assert t.window_cu_seqlens_text.tolist() == [0, 3, 4] and t.window_cu_seqlens_image.tolist() == [0, 0, 0]
    assert t.position_ids.tolist() == [0, 1, 2, 0] and t.seqlens is not None
    grid = torch.tensor([[1, 4, 4]])
    i = image_chunk([5, 6], torch.zeros(16, 4), grid)
    assert i.window_cu_seqlens_text.tolist() == [0, 2] and i.window_cu_seqlens_image.tolist() == [0, 4]
    f = frame_chunk([7, 8], [9], torch.zeros(16, 4), [[1, 4, 4]])  # pre continues, the frame opens
    assert f.window_cu_seqlens_text.tolist() == [0, 2, 3] and f.window_cu_seqlens_image.tolist() == [0, 0, 4]
    assert f.image_text_position.tolist() == [2]
    f0 = frame_chunk([], [9], torch.zeros(16, 4), grid, merge=4)  # 16 patches / 4**2 = one token
    assert f0.window_cu_seqlens_text.tolist() == [0, 1] and f0.window_cu_seqlens_image.tolist() == [0, 1]
    for b in (t, i, f, f0):
        b.validate()
    assert collate_packed([t, i]).window_cu_seqlens_text.tolist() == [0, 3, 4, 6]
