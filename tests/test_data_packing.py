"""Packing: windows against the ASCII picture, pre-shifted answer-only labels, caps, fill."""

import random

import pytest
import torch

from casa.batch import window_boundaries
from casa.processing.sample import Sample, shifted_labels
from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import resolve_tokenizer
from data.packing import Packer, build_row
from tests.data_fixtures import conv, sample


def test_windows_and_row_layout_match_the_ascii_picture():
    #   sample 0:  t t [I I I I] t t t            sample 1: [I I] t t [I I I] t
    #   text idx   0 1           2 3 4                      5 6       7
    #   windows    (t t | -)(t t t | IIII)                  (t t | II)(t | III)
    s0 = sample(5, [4], [2], key="a")
    s1 = sample(3, [2, 3], [0, 2], key="b")
    assert window_boundaries([0, 5], [2], [4]) == ([0, 2, 5], [0, 0, 4])
    assert window_boundaries([0, 3], [0, 2], [2, 3]) == ([0, 2, 3], [0, 2, 5])  # starts with an image: no empty window
    row = build_row([s0, s1])
    row.validate()
    assert row.window_cu_seqlens_text.tolist() == [0, 2, 5, 7, 8]
    assert row.window_cu_seqlens_image.tolist() == [0, 0, 4, 6, 9]
    assert row.sample_cu_seqlens.tolist() == [0, 5, 8]
    assert row.image_text_position.tolist() == [2, 5, 7]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert row.pixel_values.shape == (4 * 9, 3 * 2 * 14 * 14) and row.num_image_tokens == 9
    assert [m["key"] for m in row.meta] == ["a", "b"]


def test_consecutive_images_share_a_window_and_text_only_samples_have_one():
    #   t t t [I][I] t t      -> (t t t | -)(t t | I I)
    assert window_boundaries([0, 5], [3, 3], [1, 1]) == ([0, 3, 5], [0, 0, 2])
    #   t t t t (no image)    -> (t t t t | -)
    assert window_boundaries([0, 4], [], []) == ([0, 4], [0, 0])
    row = build_row([sample(4), sample(5, [1, 1], [3, 3])])
    row.validate()
    assert row.window_cu_seqlens_text.tolist() == [0, 4, 7, 9]
    assert row.window_cu_seqlens_image.tolist() == [0, 0, 0, 2]


def test_an_image_with_no_text_after_it_is_rejected():
    with pytest.raises(ValueError, match="must be sorted and < T"):
        build_row([sample(3, [1], [3])])


def _reference_labels(ids, mask):
    # hand computation: the target at p is the next token, if that token is an answer token
    return [ids[p + 1] if p + 1 < len(ids) and mask[p + 1] else -100 for p in range(len(ids))]


def test_labels_are_answers_and_end_token_only_pre_shifted_and_never_cross_samples():
    tok = resolve_tokenizer("char")
    tpl = ChatTemplate("helium", tok)
    encs = [tpl.encode(conv(answer=a)["messages"]) for a in ("red", "a big blue one")]
    samples = [Sample(e.input_ids, e.answer_mask, e.image_positions, [torch.zeros(4, 1176)], [[1, 2, 2]], {})
               for e in encs]
    row = build_row(samples)
    cu = row.sample_cu_seqlens.tolist()
    for e, a, (lo, hi) in zip(encs, ("red", "a big blue one"), zip(cu, cu[1:])):
        lab = row.labels[lo:hi].tolist()
        assert lab == _reference_labels(e.input_ids, e.answer_mask)
        assert tok.decode([x for x in lab if x != -100]) == a + "<|end|>"
        assert lab[-1] == -100  # the last token of a sample has no target (no cross-sample loss)
        assert tok.decode(e.input_ids[:e.prompt_len]).endswith("<|assistant|>")
    assert shifted_labels([5, 6, 7], [False, True, True]).tolist() == [6, 7, -100]


def test_caps_are_respected_and_oversize_samples_are_skipped_not_truncated():
    p = Packer(max_text_tokens=100, max_image_tokens=8, buffer_size=8)
    items = [sample(60), sample(50), sample(40), sample(30, [4]), sample(20), sample(150, key="long"),
             sample(10, [9], key="many_images"), sample(10, [2, 2])]
    rows = list(p.pack(items))
    assert p.stats.oversize == 2 and p.oversize_keys == ["long", "many_images"]
    for r in rows:
        r.validate()
        assert r.num_text_tokens <= 100 and r.num_image_tokens <= 8
    kept = sorted(len(range(a, b)) for r in rows for a, b in zip(r.sample_cu_seqlens.tolist(), r.sample_cu_seqlens.tolist()[1:]))
    assert kept == sorted([60, 50, 40, 30, 20, 10])  # whole samples, none cut


def test_buffer_takes_the_first_sample_that_fits():
    # in order: [60] [50 40] ... a 1-sample look-ahead closes the 60-row; a buffer fills it with the 40
    items = [sample(60, key="a"), sample(50, key="b"), sample(40, key="c")]
    greedy = [[m["key"] for m in r.meta] for r in Packer(100, 0, buffer_size=1).pack(items)]
    buffered = [[m["key"] for m in r.meta] for r in Packer(100, 0, buffer_size=8).pack(items)]
    assert greedy == [["a"], ["b", "c"]]
    assert buffered == [["a", "c"], ["b"]]


def test_text_fill_reaches_95_percent_on_a_mixture_of_short_samples():
    rng = random.Random(0)
    items = [sample(rng.randint(20, 300), [rng.randint(16, 256)]) for _ in range(600)]
    p = Packer(max_text_tokens=2048, max_image_tokens=20480, buffer_size=64)
    groups = list(p.plan(items))  # the rows' samples (building tensors adds nothing here)
    assert sum(len(g) for g in groups) == 600
    fill_text, fill_image = p.stats.fill(2048, 20480)
    assert fill_text >= 0.95, fill_text
    assert p.stats.row_text == [sum(s.num_text for s in g) for g in groups]
    assert max(p.stats.row_text) <= 2048
    assert fill_image == pytest.approx(sum(s.num_image_tokens for g in groups for s in g) / (len(groups) * 20480))
    in_order = Packer(max_text_tokens=2048, max_image_tokens=20480, buffer_size=1)
    list(in_order.plan(items))
    assert in_order.stats.fill(2048, 20480)[0] < fill_text  # the look-ahead is what buys the fill


def test_max_samples_per_row():
    rows = list(Packer(1000, 100, max_samples_per_row=2).pack([sample(5) for _ in range(5)]))
    assert [r.num_samples for r in rows] == [2, 2, 1]
