"""Ranks stay in lock-step whatever their batches hold (issue 14, items 2, 3 and 9).

Under FSDP2 every `fully_shard` unit all-gathers in its forward and reduce-scatters in its
backward; under DDP every trainable parameter's gradient enters a bucketed all-reduce. A
rank whose batch has no image, or whose generation stops early, would make fewer
collective calls than the others: gloo aborts ("Received data size doesn't match expected
size") or times out, NCCL hangs. Here two gloo processes, one of them text-only, train
and generate; gradients and tokens must equal single-process references.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch

from casa.fusion import CASA, CrossAttention, QFormer
from casa.generation import GenerationConfig, generate
from casa.tiny import random_packed_batch, tiny_model

STRATEGIES = {
    "casa_plus": lambda: CASA("plus"),
    # without an image, CA layers and the Q-Former use none of their parameters
    "cross_attention": lambda: CrossAttention(),
    "qformer": lambda: QFormer(num_queries=4, depth=1, heads=4),
}
# rank 0 holds images, rank 1 only text
BATCHES = [
    [[("text", 4), ("image", (2, 4)), ("text", 6)], [("text", 5)]],
    [[("text", 7)], [("text", 6)]],
]
PROMPTS = [
    [[("text", 3), ("image", (2, 2)), ("text", 3)], [("text", 4)]],
    [[("text", 5)], [("text", 3)]],
]
PROMPT_SEED = 22  # chosen so that rank 0's first tokens never occur in rank 1's output (`_stop_tokens`)
MAX_NEW = 6


def _model(name: str):
    return tiny_model(STRATEGIES[name](), hidden_size=32, num_layers=2)


def _gradients(model, batch) -> dict[str, torch.Tensor]:
    """Single-process gradients of the batch's loss; a parameter the batch does not reach
    counts as 0 (what a rank adds to the average)."""
    model.zero_grad()
    model(batch).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def _stop_tokens(name: str) -> tuple[int, ...]:
    """Rank 0's first greedy tokens, which rank 1 never emits: with them as stop tokens
    rank 0 is done after one token, rank 1 runs to the budget."""
    model = _model(name).eval()
    free = [generate(model, random_packed_batch(PROMPTS[r], seed=PROMPT_SEED + r), GenerationConfig(max_new_tokens=MAX_NEW))
            for r in range(2)]
    stop = {o[0] for o in free[0]}
    assert not stop & {t for o in free[1] for t in o}, f"{name}: no stop token separates the ranks ({free})"
    return tuple(sorted(stop))


def _references(name: str) -> dict:
    model = _model(name)
    grads = [_gradients(model, random_packed_batch(BATCHES[r], seed=10 + r)) for r in range(2)]
    mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    stop = _stop_tokens(name)
    model.eval()
    tokens = {}
    for use_cache in (True, False):
        cfg = GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=stop, use_cache=use_cache)
        tokens[use_cache] = [generate(model, random_packed_batch(PROMPTS[r], seed=PROMPT_SEED + r), cfg) for r in range(2)]
    assert max(len(o) for o in tokens[True][0]) < max(len(o) for o in tokens[True][1]), tokens
    return {"grads": mean, "stop": stop, "tokens": tokens}


def _fsdp2(model, mesh):
    """As `CasaModule.configure_model`: one unit per decoder block and per vision block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.backbone.layers:
        fully_shard(block, mesh=mesh)
    for block in model.vision.tower.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, init: str, refs: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    # a mismatched collective that gloo cannot diagnose waits; fail instead of hanging
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        mesh = init_device_mesh("cpu", (2,))
        batch = random_packed_batch(BATCHES[rank], seed=10 + rank)
        prompts = random_packed_batch(PROMPTS[rank], seed=PROMPT_SEED + rank)
        for name, ref in refs.items():
            # FSDP2: train step (gradients averaged by the reduce-scatters), then a no-grad forward
            model = _fsdp2(_model(name), mesh)
            model(batch).loss.backward()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None, (name, n)
                    torch.testing.assert_close(p.grad.full_tensor(), ref["grads"][n], atol=1e-5, rtol=1e-4,
                                               msg=f"FSDP2 {name} {n}")
            model.eval()
            with torch.no_grad():
                model(batch)
            # FSDP2 generation in lock-step: rank 0 stops early, rank 1 runs to the budget
            forwards = []
            model.backbone.layers[0].register_forward_pre_hook(lambda *_: forwards.append(1))
            for use_cache in (True, False):
                forwards.clear()
                cfg = GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=ref["stop"], use_cache=use_cache)
                assert generate(model, prompts, cfg, sync=True) == ref["tokens"][use_cache][rank], (name, use_cache)
                counts = [None, None]
                dist.all_gather_object(counts, len(forwards))
                assert counts[0] == counts[1] == MAX_NEW, (name, use_cache, counts)
            # DDP (Lightning's default: find_unused_parameters=False)
            ddp = DistributedDataParallel(_model(name))
            ddp(batch).loss.backward()
            for n, p in ddp.module.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None, (name, n)
                    torch.testing.assert_close(p.grad, ref["grads"][n], atol=1e-5, rtol=1e-4, msg=f"DDP {name} {n}")
        dist.barrier()  # every collective done on both ranks before either tears gloo down
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, nprocs: int = 2, timeout: float = 120.0) -> None:
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"ranks still running after {timeout:.0f} s: a collective hangs")


@pytest.mark.distributed
def test_text_only_rank_trains_and_generates_in_lock_step_under_fsdp2_and_ddp(tmp_path):
    """Rank 1's batch and prompts have no image and its generation runs 4 steps longer than
    rank 0's: both ranks finish, gradients equal the single-process average, every rank
    makes the same number of block forwards, and the tokens are those of a lone process."""
    # CASA's and CA's parameters sit in the per-block FSDP2 units, the Q-Former's in the root:
    # the Q-Former's idle-sample gradients are checked in one process below
    refs = {name: _references(name) for name in ("casa_plus", "cross_attention")}
    _spawn(_worker, (f"file://{tmp_path / 'pg'}", refs))


def test_idle_sample_changes_no_number_and_reaches_every_parameter(monkeypatch):
    """With several ranks a text-only batch carries the idle sample: loss and logits are
    those without it, and every trainable parameter gets a gradient (0 where the batch does
    not reach it), as FSDP2's reduce-scatters and DDP's buckets need on every rank."""
    import casa.model

    batch = random_packed_batch(BATCHES[1], seed=11)
    for name in STRATEGIES:
        model = _model(name)
        ref = model(batch)
        ref_grads = _gradients(model, batch)
        monkeypatch.setattr(casa.model, "_world_size", lambda: 2)
        assert model.needs_idle_sample(batch) and not model.needs_idle_sample(batch, images_on_any_rank=False)
        model.zero_grad()
        out = model(batch)
        out.loss.backward()
        monkeypatch.undo()
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, (name, n)
                torch.testing.assert_close(p.grad, ref_grads[n], msg=f"{name} {n}")


def test_casa_trains_on_a_text_only_batch():
    """Text-only samples are legal input: CASA's fused image K/V backward takes N = 0 image tokens."""
    model = _model("casa_plus")
    model(random_packed_batch(BATCHES[1], seed=11)).loss.backward()
    assert model.backbone.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("use_cache", [True, False])
def test_fsdp2_model_generates_without_a_forward_before(tmp_path, use_cache):
    """`generate` on a freshly `fully_shard`ed model (one gloo process) gives the plain model's
    tokens with no root forward before it, and training forwards still work afterwards
    (generation did not make a block FSDP's root)."""
    import torch.distributed as dist

    prompts = random_packed_batch(PROMPTS[0], seed=PROMPT_SEED)
    batch = random_packed_batch(BATCHES[0], seed=10)
    cfg = GenerationConfig(max_new_tokens=4, use_cache=use_cache)
    plain = _model("casa_plus").eval()
    expected = generate(plain, prompts, cfg)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = _model("casa_plus").eval()
        from torch.distributed.device_mesh import init_device_mesh

        _fsdp2(wrapped, init_device_mesh("cpu", (1,)))
        assert generate(wrapped, prompts, cfg) == expected
        wrapped.train()
        loss = wrapped(batch).loss
        loss.backward()
        torch.testing.assert_close(loss, plain.train()(batch).loss)
    finally:
        dist.destroy_process_group()
