"""The GPU lane's checks, as functions of the device and the kernel.

`tests/gpu/test_gpu.py` calls them on CUDA with the real kernels (flash-attn, compiled
flex, FSDP2 on NCCL, `torch.cuda.set_sync_debug_mode`); `tests/gpu/test_lane_on_cpu.py`
calls the same functions on CPU with CPU kernels and stand-ins, so the lane's own code is
known to run before a GPU is ever lent. Each check raises AssertionError on failure and
returns a one-line result for the lane's table.

Shapes: T text tokens (queries), Tk keys, H query heads, Hkv key/value heads, D head dim,
W segments (`casa.attention`'s glossary).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from casa.attention import varlen_attention
from tests.builders import SyncCounter

ROOT = Path(__file__).resolve().parents[2]

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool, float], torch.Tensor]
"""(q [T, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D], cu_q [W+1] int32, cu_k [W+1] int32, causal, scale)
-> out [T, H, D]: `casa.attention.varlen_attention`'s contract."""

# ---------------------------------------------------------------------------- attention
# (Lq, Lk) per segment, and causal. CASA windows are [image_w | text_w] keys for text_w
# queries, causal bottom-right (every text token sees the whole image); the rest are the
# edge cases `varlen_attention` declares legal (zeros where a query sees no key).
LAYOUTS: dict[str, tuple[list[tuple[int, int]], bool]] = {
    # image + text windows of several image sizes, a window without image (Lq == Lk), an empty window
    "casa_windows": ([(40, 256 + 40), (25, 64 + 25), (30, 30), (0, 0), (17, 1024 + 17)], True),
    # keys without queries, queries without keys, and Lq > Lk (the first 5 queries see nothing)
    "edge_segments": ([(0, 64), (12, 0), (20, 20), (9, 4)], True),
    # packed self-attention over samples: cu_q == cu_k
    "self_attention": ([(100, 100), (1, 1), (57, 57)], True),
    # cross-attention / Q-Former: image keys only, not causal; empty segments
    "cross_attention": ([(20, 256), (0, 0), (7, 64), (5, 0)], False),
}
HEADS: dict[str, tuple[int, int, int]] = {
    "gqa": (8, 2, 64),  # (H, Hkv, D): 4 query heads per key/value head
    "helium": (16, 8, 128),  # Helium-1 2B, the paper's backbone
}
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
"""Absolute part of the tolerance, relative to the reference's largest magnitude."""


def _cu(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def attention_inputs(layout: str, heads: str, dtype: torch.dtype, device, seed: int = 0):
    """-> q [T, H, D], k, v [Tk, Hkv, D], dout [T, H, D] (all `dtype`), cu_q, cu_k [W+1] int32."""
    segs, _ = LAYOUTS[layout]
    H, Hkv, D = HEADS[heads]
    T, Tk = sum(a for a, _ in segs), sum(b for _, b in segs)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, D, generator=g) for n, h in ((T, H), (Tk, Hkv), (Tk, Hkv)))
    dout = torch.randn(T, H, D, generator=g)
    q, k, v, dout = (x.to(device, dtype) for x in (q, k, v, dout))
    return q, k, v, dout, _cu([a for a, _ in segs], device), _cu([b for _, b in segs], device)


def keyless_rows(layout: str) -> list[int]:
    """Query rows that see no key (their output and dq must be exactly 0)."""
    segs, causal = LAYOUTS[layout]
    rows, q0 = [], 0
    for lq, lk in segs:
        rows += [q0 + j for j in range(lq) if lk == 0 or (causal and lk - lq + j < 0)]
        q0 += lq
    return rows


def varlen_kernel(backend: str) -> Kernel:
    """`casa.attention.varlen_attention` with `backend` (on CUDA, `flex` is the compiled one)."""
    def kernel(q, k, v, cu_q, cu_k, causal, scale):
        return varlen_attention(q, k, v, cu_q, cu_k, causal, backend, scale=scale)

    kernel.__name__ = f"varlen_attention[{backend}]"
    return kernel


def flash_varlen_kernel(flash_attn_varlen_func: Callable) -> Kernel:
    """A kernel calling `flash_attn_varlen_func` (flash-attn 2.x) directly, as documented:
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False) with int32 boundaries and int max lengths."""
    def kernel(q, k, v, cu_q, cu_k, causal, scale):
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
                                      causal=causal)

    kernel.__name__ = "flash_attn_varlen_func"
    return kernel


def _run(kernel: Kernel, q, k, v, dout, cu_q, cu_k, causal, dtype, backward) -> dict[str, torch.Tensor]:
    """-> {"out", and with `backward` "dq", "dk", "dv"} in fp32, inputs cast to `dtype` first."""
    leaves = [x.detach().to(dtype).requires_grad_(backward) for x in (q, k, v)]
    with torch.set_grad_enabled(backward):
        out = kernel(*leaves, cu_q, cu_k, causal, q.shape[-1] ** -0.5)
    got = {"out": out.detach().float()}
    if backward:
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
        got |= {n: (torch.zeros_like(x) if g is None else g).float() for n, g, x in zip(("dq", "dk", "dv"), grads, leaves)}
    return got


def check_attention(kernel: Kernel, layout: str, heads: str = "gqa", dtype: torch.dtype = torch.bfloat16,
                    device="cuda", backward: bool = True, seed: int = 0) -> str:
    """`kernel` against `varlen_attention(..., backend="dense")` on `LAYOUTS[layout]`.

    Tolerance as in flash-attn's own tests: the kernel in `dtype` may be at most twice as far
    from the fp32 dense reference (same `dtype`-rounded inputs) as the dense reference run in
    `dtype` is, plus FLOOR[dtype] x the reference's magnitude. Rows that see no key must be
    exactly zero (out and dq), and everything finite. -> "worst err/tol 0.41 (dk), ..."."""
    _, causal = LAYOUTS[layout]
    q, k, v, dout, cu_q, cu_k = attention_inputs(layout, heads, dtype, device, seed)
    dense = varlen_kernel("dense")
    ref = _run(dense, q, k, v, dout, cu_q, cu_k, causal, torch.float32, backward)
    base = _run(dense, q, k, v, dout, cu_q, cu_k, causal, dtype, backward)
    got = _run(kernel, q, k, v, dout, cu_q, cu_k, causal, dtype, backward)
    name = getattr(kernel, "__name__", "kernel")
    ratios, failures = {}, []
    for key, r in ref.items():
        g = got[key]
        if g.shape != r.shape:
            failures.append(f"{key}: shape {tuple(g.shape)}, reference {tuple(r.shape)}")
            continue
        if not torch.isfinite(g).all():
            failures.append(f"{key}: {int((~torch.isfinite(g)).sum())} non-finite values")
            continue
        err = float((g - r).abs().max()) if r.numel() else 0.0
        tol = 2 * (float((base[key] - r).abs().max()) if r.numel() else 0.0) + FLOOR[dtype] * max(
            1.0, float(r.abs().max()) if r.numel() else 0.0)
        ratios[key] = err / tol
        if err > tol:
            failures.append(f"{key}: max |{name} - dense fp32| = {err:.3g} > tol {tol:.3g}")
    rows = keyless_rows(layout)
    for key in ("out", "dq") if backward else ("out",):
        if rows and got[key][rows].abs().max() != 0:
            failures.append(f"{key}: rows {rows} see no key and must be 0, max |.| = "
                            f"{float(got[key][rows].abs().max()):.3g}")
    where = f"{name} on {layout} ({heads}, {str(dtype)[6:]}, {torch.device(device).type})"
    assert not failures, f"{where}: " + "; ".join(failures)
    worst = max(ratios, key=ratios.get)
    return f"worst err/tol {ratios[worst]:.2f} ({worst}){'' if backward else ', forward only'}"


def check_kvcache(flash_attn_with_kvcache: Callable, dtype: torch.dtype = torch.bfloat16, device="cuda",
                  heads: str = "gqa", new_tokens: int = 3, seed: int = 0) -> str:
    """Cached decoding through `flash_attn_with_kvcache` (flash-attn 2.x: q [B, Sq, H, D],
    k_cache / v_cache [B, S, Hkv, D], new k / v [B, Sq, Hkv, D] appended in place at
    `cache_seqlens` [B] int32, causal bottom-right) against the dense varlen reference over
    each sample's cached + new keys. Samples hold caches of different lengths, one empty."""
    H, Hkv, D = HEADS[heads]
    lengths = [37, 0, 250, 128]  # cached tokens per sample
    B, S, Sq = len(lengths), 512, new_tokens
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g).to(device, dtype)
    k_new, v_new = (torch.randn(B, Sq, Hkv, D, generator=g).to(device, dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(B, S, Hkv, D, generator=g).to(device, dtype) for _ in range(2))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                  softmax_scale=D ** -0.5, causal=True)  # [B, Sq, H, D]
    # reference: per sample, keys = cache[:L] + the new tokens, Sq queries bottom-right
    keys = torch.cat([torch.cat([k_before[b, :n], k_new[b]]) for b, n in enumerate(lengths)])  # [sum(L + Sq), Hkv, D]
    vals = torch.cat([torch.cat([v_before[b, :n], v_new[b]]) for b, n in enumerate(lengths)])
    cu_q = _cu([Sq] * B, device)
    cu_k = _cu([n + Sq for n in lengths], device)
    ref = varlen_attention(q.reshape(B * Sq, H, D).float(), keys.float(), vals.float(), cu_q, cu_k, True, "dense",
                           scale=D ** -0.5)
    base = varlen_attention(q.reshape(B * Sq, H, D), keys, vals, cu_q, cu_k, True, "dense", scale=D ** -0.5)
    err = float((out.reshape(B * Sq, H, D).float() - ref).abs().max())
    tol = 2 * float((base.float() - ref).abs().max()) + FLOOR[dtype] * max(1.0, float(ref.abs().max()))
    failures = []
    if not torch.isfinite(out).all() or err > tol:
        failures.append(f"out: max |flash_attn_with_kvcache - dense fp32| = {err:.3g} > tol {tol:.3g}")
    for b, n in enumerate(lengths):  # the new tokens are written at cache_seqlens, the rest untouched
        if not (torch.equal(k_cache[b, n:n + Sq], k_new[b]) and torch.equal(v_cache[b, n:n + Sq], v_new[b])):
            failures.append(f"sample {b}: new keys/values not written at cache_seqlens={n}")
        if not (torch.equal(k_cache[b, :n], k_before[b, :n]) and torch.equal(k_cache[b, n + Sq:], k_before[b, n + Sq:])):
            failures.append(f"sample {b}: cache changed outside [cache_seqlens, cache_seqlens + {Sq})")
    assert not failures, "flash_attn_with_kvcache: " + "; ".join(failures)
    return f"err/tol {err / tol:.2f}, cache appended in place"


# ---------------------------------------------------------------------------- FSDP2 step
CONFIGS = ROOT / "experiments" / "configs"


def fsdp2_step(workdir: Path, accelerator: str, attn_backend: str, param_dtype: str | None, steps: int = 2,
               timeout: float = 600) -> str:
    """`python -m experiments.fit` with the demo + tiny configs under the H100 FSDP2 trainer
    (experiments/configs/trainer/fsdp2_h100.yaml: ModelParallelStrategy, activation
    checkpointing, FSDP2 mixed precision), on 1 device, `steps` optimizer steps of 2
    accumulated micro-batches and one validation with generation; train and val loss finite.

    Run in `workdir` (the tiny synthetic set is generated there), as a subprocess: the
    strategy sets up a process group, which must not outlive the check."""
    run_dir = workdir / "run"
    files = [CONFIGS / "demo.yaml", ROOT / "tests" / "configs" / "tiny.yaml", CONFIGS / "trainer" / "fsdp2_h100.yaml"]
    args = [a for f in files for a in ("--config", str(f))]
    args += ["--trainer.accelerator", accelerator, "--trainer.devices", "1",
             "--trainer.strategy.init_args.data_parallel_size", "1", "--trainer.accumulate_grad_batches", "2",
             "--model.fsdp_param_dtype", param_dtype or "null",
             "--model.model.init_args.backbone.init_args.attn_backend", attn_backend,
             "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
             "--run_dir", str(run_dir)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "experiments.fit", *args], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"experiments.fit exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    summary = json.loads((run_dir / "metrics.json").read_text())
    metrics = summary["metrics"]
    assert summary["global_step"] == steps, f"global_step {summary['global_step']}, expected {steps}"
    for key in ("train/loss", "val/loss"):
        assert key in metrics and math.isfinite(metrics[key]), f"{key} = {metrics.get(key)} (metrics.json: {metrics})"
    return (f"{steps} steps, {attn_backend}, params {param_dtype or 'fp32'}: train/loss {metrics['train/loss']:.3f}, "
            f"val/loss {metrics['val/loss']:.3f}")


# ---------------------------------------------------------------------------- host syncs
# On CPU the lane counts with `tests.builders.SyncCounter` (the ops that would sync a CUDA
# host); on CUDA with `count_cuda_syncs`, which yields the same record.
@contextmanager
def count_cuda_syncs() -> Iterator[SyncCounter]:
    """Count the host syncs CUDA's sync debug mode reports (one warning each, backward
    included: autograd replays its threads' warnings on the caller's thread), into a
    `SyncCounter`'s `where` ("sync at file:line"); its own CPU counting is not entered."""
    count = SyncCounter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in seen:
        if "synchroniz" in str(w.message):
            count.where.append(f"sync at {Path(w.filename).name}:{w.lineno}")


def tiny_train_step(num_layers: int, attn_backend: str, device, dtype: torch.dtype) -> Callable[[], float]:
    """-> one training step (forward, loss, backward, optimizer step) of a tiny CASA⊕ model
    with `num_layers` decoder layers, on a packed batch of 3 samples (image + text windows, a
    text-only sample) already on `device`; the step returns the loss.

    SGD, not Adam: the model's syncs are what is counted, and Adam reads its per-parameter
    step counters, host tensors that never sync a GPU but that `SyncCounter` would count
    (one per parameter, so growing with depth)."""
    from casa.fusion import CASA
    from casa.tiny import random_packed_batch, tiny_model

    model = tiny_model(CASA("plus"), num_layers=num_layers, attn_backend=attn_backend).to(device, dtype)
    batch = random_packed_batch([[("text", 5), ("image", (4, 4)), ("text", 9)],
                                 [("image", (4, 6)), ("text", 7), ("image", (2, 2)), ("text", 4)],
                                 [("text", 11)]]).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def check_syncs_per_step(make_step: Callable[[int], Callable], count_syncs: Callable, layers=(2, 4)) -> str:
    """Host syncs of one training step do not grow with the number of layers.

    `make_step(n)` -> a step of an n-layer model; each is warmed up once (lazy state,
    kernel selection), then one step is counted under `count_syncs()` (`tests.builders.SyncCounter`
    on CPU, `count_cuda_syncs` on CUDA: anything yielding `count` and `where`); its loss must
    be finite."""
    counts, where = {}, {}
    for n in layers:
        step = make_step(n)
        step()
        with count_syncs() as c:
            loss = step()
        assert math.isfinite(float(loss)), f"{n} layers: loss {float(loss)}"
        counts[n], where[n] = c.count, c.where
    few, many = layers[0], layers[-1]
    extra = Counter(where[many]) - Counter(where[few])  # the syncs the deeper model adds, by site
    assert counts[many] <= counts[few], (
        f"host syncs per step grow with depth: {counts}; {many} layers add "
        + ", ".join(f"{site} x{n}" for site, n in extra.most_common(6)))
    return f"{' / '.join(f'{n} layers: {counts[n]}' for n in layers)} syncs per step"


# ---------------------------------------------------------------------------- layer memory
def layer_peak_memory(device, dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> str:
    """Peak extra memory of one training step (forward + backward) of one CASA⊕ decoder layer
    at Helium-1 2B widths on the paper's Table 11 row (10 x (1024 image + 50 text) tokens),
    as `python -m experiments.bench layer` measures it (`quick`: its tiny setting). On CUDA
    `torch.cuda.max_memory_allocated`, on CPU the profiler's allocation events."""
    from experiments.benchmarks import layer, measure

    dev = torch.device(device)
    s = layer.QUICK if quick else layer.FULL
    model = layer.build_model("casa_plus", s, dtype, dev, "helium")
    step, shape = layer.train_case(model, s, dev)
    step()  # warm-up, as the benchmark does
    peak = measure.peak_memory(step, dev, rss=False)["alloc_bytes"]
    assert peak > 0, f"peak memory {peak} bytes: the step allocated nothing?"
    return (f"{peak / measure.MiB:.1f} MiB peak extra ({shape['stream_tokens']} text + {shape['image_keys']} image "
            f"tokens, {str(dtype)[6:]}{', quick widths' if quick else ''})")
