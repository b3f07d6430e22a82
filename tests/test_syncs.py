"""Host syncs and copies on the hot path (issue 14, item 8; `PackedBatch.to` from item 9).

Counted on CPU with `tests.builders.SyncCounter` (the ops that would make the host wait for a
CUDA device); the GPU lane checks the same bound with `torch.cuda.set_sync_debug_mode`."""

import dataclasses

import pytest
import torch

from casa.batch import PackedBatch, SeqLens, collate_packed, seqlens_of
from casa.fusion import CASA
from casa.tiny import random_packed_batch, tiny_model
from experiments.strategies import build_fusion, names
from tests.builders import SyncCounter, flash_stand_in, strict_flash_attn_varlen_func

LAYOUT = [[("text", 5), ("image", (4, 4)), ("text", 7)], [("image", (2, 4)), ("text", 6), ("image", (2, 2)), ("text", 3)]]


def _syncs_per_step(strategy: str, num_layers: int, batch: PackedBatch) -> SyncCounter:
    """Syncs of one bf16-autocast training step (forward + backward, activation checkpointing
    on: each block runs twice) with the flash backend behind the strict stand-in."""
    model = tiny_model(build_fusion(strategy), num_layers=num_layers, attn_backend="flash").train()
    model.activation_checkpointing = True
    with flash_stand_in(model=model), SyncCounter() as syncs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch).loss
        loss.backward()
    return syncs


KNOWN_PER_LAYER_SYNCS: dict[str, str] = {}
"""Strategies of the matrix known to sync once per layer: strict xfails, so a fix shows up."""


@pytest.mark.parametrize("strategy", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_PER_LAYER_SYNCS[n])) if n in KNOWN_PER_LAYER_SYNCS
    else n for n in names()])
def test_host_syncs_per_step_do_not_grow_with_layers(strategy):
    batch = random_packed_batch(LAYOUT)
    assert batch.seqlens is not None  # the collate carries the max lengths
    two, four = _syncs_per_step(strategy, 2, batch), _syncs_per_step(strategy, 4, batch)
    assert two.count == four.count, (two.where, four.where)
    # without the host max lengths every flash call reads cu_seqlens back: the count grows
    # per layer (this is what the bound above guards against)
    unknown = dataclasses.replace(batch, seqlens=None)
    assert _syncs_per_step(strategy, 4, unknown).count > _syncs_per_step(strategy, 2, unknown).count


def test_sync_counter_sees_the_usual_syncs():
    """What would sync a CUDA host is counted once each, in order, at its caller's line;
    reads made in C++ (`torch.arange` of a tensor) and tensor repeats of one element too."""
    t = torch.tensor([1, 2, 3])
    with SyncCounter() as syncs:
        t + 1, t.sum(), t[1:], torch.searchsorted(t, t), t.repeat_interleave(2)  # no sync
        t.tolist(), t[0].item(), bool(t[0] > 0), int(t[1]), float(t[1]), t.nonzero(), t[t > 1]
        torch.repeat_interleave(t, t), t.repeat_interleave(torch.tensor(2)), torch.arange(t[2]), t.numpy()
        with SyncCounter.paused():
            t.tolist()
    assert [w.split(" at ")[0] for w in syncs.where] == [
        "tolist", "item", "__bool__", "__int__", "__float__", "nonzero", "index[bool]", "repeat_interleave",
        "repeat_interleave", "_local_scalar_dense", "numpy"]
    assert all(w.split(" at ")[1].startswith("test_syncs.py:") for w in syncs.where), syncs.where  # the caller


# ---------------------------------------------------------------------- SeqLens
def test_seqlens_of_the_docstring_example():
    """casa/batch.py's example: samples [0, 5, 8], windows (t t | -)(t t t | IIII)(t t | II)(t | III)."""
    lens = seqlens_of([0, 5, 8], [0, 2, 5, 7, 8], [0, 0, 4, 6, 9])
    assert lens == SeqLens(sample_text=5, sample_all=9, window_text=3, window_image=4, window_all=7)


def test_collate_and_packing_carry_seqlens_that_match_the_boundaries():
    from casa.processing.sample import Sample
    from data.packing import build_row

    batch = random_packed_batch(LAYOUT)
    batch.validate()  # checks seqlens against the boundaries
    assert batch.seqlens == SeqLens(sample_text=12, sample_all=16, window_text=7, window_image=4, window_all=11)
    row = build_row([Sample([1] * 6, [False] * 6, [2], [torch.zeros(16, 1176)], [[1, 4, 4]]),
                     Sample([1] * 3, [False] * 3, [], [], [])])
    row.validate()
    assert row.seqlens == SeqLens(sample_text=6, sample_all=10, window_text=4, window_image=4, window_all=8)
    with pytest.raises(ValueError, match="PackedBatch.seqlens=.*disagrees"):
        dataclasses.replace(row, seqlens=dataclasses.replace(row.seqlens, window_all=1)).validate()
    # a CPU row without them (built by hand) gets them computed
    assert collate_packed([dataclasses.replace(row, seqlens=None), row]).seqlens == row.seqlens


# ---------------------------------------------------------------------- PackedBatch.to
def test_to_is_non_blocking_exactly_from_pinned_memory_to_cuda(monkeypatch):
    """No CUDA here: `Tensor.to` and `is_pinned` are recorded / faked, the choice is what is tested."""
    batch = random_packed_batch(LAYOUT)
    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: calls.append(non_blocking) or self)
    for pinned, device, want in [(False, "cuda", False), (True, "cuda", True), (True, "cpu", False)]:
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, pinned=pinned: pinned)
        calls.clear()
        batch.to(device)
        assert calls and set(calls) == {want}, (pinned, device)
    calls.clear()
    batch.to("cuda", non_blocking=True)  # what transfer_batch_to_device asks for
    assert set(calls) == {True}


def test_the_dataloader_pins_a_packed_batch(monkeypatch):
    """torch's pinning thread calls `pin_memory()` on custom batch types: every tensor is pinned."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = random_packed_batch(LAYOUT)
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.data_ptr()) or self.clone())
    out = pin_memory(batch)
    assert isinstance(out, PackedBatch) and out.seqlens == batch.seqlens and out.meta == batch.meta
    tensors = [getattr(batch, f.name) for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    assert sorted(pinned) == sorted(t.data_ptr() for t in tensors)


# ---------------------------------------------------------------------- cached decoding with flash
def test_flash_decoding_reads_the_one_sample_cache_in_place():
    """A one-sample cached decoding step hands flash-attn a view of the cache's buffer (no
    per-token concatenation or copy of the KV cache), and generates what sdpa generates."""
    from casa.generation import GenerationConfig, generate, truncate_samples

    batch = random_packed_batch(LAYOUT[:1])
    prompts = truncate_samples(batch, [10])
    steps = []

    def spy(q, k, v, *args, **kwargs):
        if q.shape[0] == 1:  # a decoding step: one new token
            steps.append(k._base is not None and v._base is not None)  # views of a buffer, not fresh copies
        return strict_flash_attn_varlen_func(q, k, v, *args, **kwargs)

    out = {}
    for backend in ("flash", "sdpa"):
        model = tiny_model(CASA(mode="plus"), num_layers=2, attn_backend=backend).to(torch.bfloat16).eval()
        with flash_stand_in(spy, model=model):
            out[backend] = generate(model, prompts, GenerationConfig(max_new_tokens=4, stop_token_ids=()))
    assert steps and all(steps), steps
    assert out["flash"] == out["sdpa"]


def _decode_step_syncs(strategy: str, num_layers: int, samples: int) -> SyncCounter:
    """Syncs of one cached decoding step (one new token per sample) after the prompt, with
    the flash backend (behind the strict stand-ins) in bf16: the GPU path. (CPU's `sdpa` loops
    over segments on the host by design; a host read costs nothing there.)"""
    from casa.cache import KVCache
    from casa.generation import text_chunk

    model = tiny_model(build_fusion(strategy), num_layers=num_layers, attn_backend="flash").eval()
    prompts = random_packed_batch(LAYOUT[:samples], seed=4)
    cache = KVCache(samples)
    with torch.no_grad(), flash_stand_in(model=model), torch.autocast("cpu", dtype=torch.bfloat16):
        model.last_logits(prompts, cache=cache)
        step = text_chunk([[7]] * samples)
        with SyncCounter() as syncs:
            model.last_logits(step, cache=cache, images_on_any_rank=False)
    return syncs


WINDOW_CACHE_GAP = ("several samples under flash: the CASA/CA window caches hand segmented keys to a whole-stream "
                    "kernel, which reads their lengths back per layer (casa/cache.py `window`); the SA cache "
                    "no longer does (`_flash_self_attention`)")


@pytest.mark.parametrize("strategy, samples", [
    ("casa_plus", 1), ("cross_attention", 1), ("insertion", 1), ("insertion", 2),
    pytest.param("casa_plus", 2, marks=pytest.mark.xfail(strict=True, reason=WINDOW_CACHE_GAP)),
    pytest.param("cross_attention", 2, marks=pytest.mark.xfail(strict=True, reason=WINDOW_CACHE_GAP))])
def test_cached_decoding_step_syncs_do_not_grow_with_layers(strategy, samples):
    """The chunk's boundaries are shared by every layer: the cache reads each back once per
    chunk, not once per layer (per token, on the generation hot path)."""
    two, four = (_decode_step_syncs(strategy, n, samples) for n in (2, 4))
    assert two.count == four.count, (two.where, four.where)
