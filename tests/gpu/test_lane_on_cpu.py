"""The GPU lane's checks (tests/gpu/checks.py) run on CPU, in the default suite: the same
functions the lane calls on CUDA, with CPU kernels and stand-ins for the CUDA-only ones, so
that the lane's own code is known to run, and to fail when it should, before a GPU is lent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from casa.attention import varlen_attention
from tests.builders import SyncCounter, flash_stand_in, strict_flash_attn_varlen_func
from tests.gpu import checks

ROOT = checks.ROOT


# ---------------------------------------------------------------------------- stand-ins
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2.x's `flash_attn_with_kvcache` on CPU, for what the check uses: new k / v
    written into the caches in place at `cache_seqlens`, then per sample a softmax over
    cache[:L + Sq] (bottom-right causal), written independently of casa (a per-sample loop)."""
    if rotary_cos is not None or cache_batch_idx is not None or block_table is not None or softcap:
        raise NotImplementedError("the CPU stand-in covers the arguments the GPU lane passes")
    B, Sq, H, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(cache_seqlens[b])
        if k is not None:
            k_cache[b, n:n + Sq], v_cache[b, n:n + Sq] = k[b], v[b]
            n += Sq
        keys = k_cache[b, :n].float().repeat_interleave(H // Hkv, dim=1)  # [n, H, D]
        vals = v_cache[b, :n].float().repeat_interleave(H // Hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[b].float(), keys) * softmax_scale  # [H, Sq, n]
        if causal:
            s = s.masked_fill(torch.ones(Sq, n, dtype=torch.bool).tril(n - Sq).logical_not(), float("-inf"))
        out[b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vals).to(q.dtype)
    return out


# ---------------------------------------------------------------------------- attention
@pytest.mark.parametrize("layout", list(checks.LAYOUTS))
@pytest.mark.parametrize("backend, dtype, backward", [("sdpa", torch.float32, True), ("eager", torch.float32, True),
                                                      ("sdpa", torch.bfloat16, True),
                                                      ("flex", torch.float32, False)])  # CPU flex: forward only
def test_attention_check_passes_cpu_backends(layout, backend, dtype, backward):
    result = checks.check_attention(checks.varlen_kernel(backend), layout, "gqa", dtype, "cpu", backward)
    assert result.startswith("worst err/tol")


@pytest.mark.parametrize("layout", list(checks.LAYOUTS))
def test_attention_check_through_strict_flash(layout):
    """The lane's two flash kernels (flash_attn_varlen_func called directly, and the `flash`
    backend), against a stand-in enforcing flash-attn's contract, in bf16."""
    checks.check_attention(checks.flash_varlen_kernel(strict_flash_attn_varlen_func), layout, "gqa",
                           torch.bfloat16, "cpu")
    with flash_stand_in():
        checks.check_attention(checks.varlen_kernel("flash"), layout, "gqa", torch.bfloat16, "cpu")


def test_attention_check_at_helium_heads():
    checks.check_attention(checks.varlen_kernel("sdpa"), "casa_windows", "helium", torch.bfloat16, "cpu")


def _top_left_causal(q, k, v, cu_q, cu_k, causal, scale):
    """A kernel with the other causal convention: query j sees keys 0..j (top-left)."""
    outs = []
    for w in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[w]), int(cu_q[w + 1]), int(cu_k[w]), int(cu_k[w + 1])
        lq, lk = q1 - q0, k1 - k0
        mask = torch.ones(lq, lk, dtype=torch.bool).tril() if causal else torch.ones(lq, lk, dtype=torch.bool)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1].repeat_interleave(q.shape[1] // k.shape[1], 1)) * scale
        p = s.float().masked_fill(~mask, -1e30).softmax(-1).nan_to_num() * mask
        outs.append(torch.einsum("hqk,khd->qhd", p.to(v.dtype), v[k0:k1].repeat_interleave(q.shape[1] // k.shape[1], 1)))
    return torch.cat(outs)


def _nonzero_keyless_rows(q, k, v, cu_q, cu_k, causal, scale):
    """The reference, except rows without keys get 1e-2 instead of 0."""
    out = varlen_attention(q, k, v, cu_q, cu_k, causal, "dense", scale=scale)
    return out + 1e-2 * (out == 0).all(-1, keepdim=True).all(-2, keepdim=True)


def test_attention_check_fails_on_wrong_kernels():
    """The check can fail: a top-left causal kernel (wrong for CASA windows), one whose keyless
    rows are not zero, one off by more than bf16 rounding."""
    with pytest.raises(AssertionError, match=r"out: max \|_top_left_causal - dense fp32\|"):
        checks.check_attention(_top_left_causal, "casa_windows", "gqa", torch.bfloat16, "cpu", backward=False)
    with pytest.raises(AssertionError, match=r"out: rows \[\d+, .*\] see no key and must be 0"):
        checks.check_attention(_nonzero_keyless_rows, "edge_segments", "gqa", torch.float32, "cpu")
    sloppy = lambda q, *a: varlen_attention(q, *a[:4], "dense", scale=a[4] * 1.02)  # noqa: E731
    with pytest.raises(AssertionError, match="> tol"):
        checks.check_attention(sloppy, "self_attention", "gqa", torch.bfloat16, "cpu")


def test_kvcache_check_with_cpu_stand_in():
    assert "appended in place" in checks.check_kvcache(flash_attn_with_kvcache, torch.bfloat16, "cpu")

    def forgets_to_append(q, k_cache, v_cache, k=None, v=None, **kw):
        return flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k=k, v=v, **kw)

    with pytest.raises(AssertionError, match="new keys/values not written at cache_seqlens"):
        checks.check_kvcache(forgets_to_append, torch.bfloat16, "cpu")


# ---------------------------------------------------------------------------- host syncs
def test_sync_check_fails_when_syncs_grow_with_layers():
    def make_step(layers, per_layer):
        x = torch.ones(3)

        def step():
            for _ in range(layers if per_layer else 1):
                x.sum().item()
            return x.sum()
        return step

    assert checks.check_syncs_per_step(lambda n: make_step(n, False), SyncCounter) == \
        "2 layers: 1 / 4 layers: 1 syncs per step"
    with pytest.raises(AssertionError, match=r"grow with depth: \{2: 2, 4: 4\}; 4 layers add item at test_lane_on_cpu.py:\d+ x2"):
        checks.check_syncs_per_step(lambda n: make_step(n, True), SyncCounter)


def test_sync_check_runs_the_tiny_model_through_strict_flash():
    """The lane's step (tiny CASA⊕, bf16, flash backend) on CPU through the strict stand-in
    (its own host work not counted: flash-attn does none) passes the check: the collate's
    host max lengths reach every flash call, so no layer reads `cu_seqlens` back."""
    with flash_stand_in():
        result = checks.check_syncs_per_step(lambda n: checks.tiny_train_step(n, "flash", "cpu", torch.bfloat16),
                                             SyncCounter)
    assert result.startswith("2 layers: ") and result.endswith(" syncs per step"), result


# ---------------------------------------------------------------------------- FSDP2, memory, runner
def test_fsdp2_bf16_step_on_cpu(tmp_path):
    """The lane's FSDP2 step (fsdp2_h100.yaml on 1 device, bf16 parameters) on CPU with sdpa."""
    assert "train/loss" in checks.fsdp2_step(tmp_path, "cpu", "sdpa", "bfloat16")


def test_layer_peak_memory_on_cpu():
    assert "MiB peak extra" in checks.layer_peak_memory("cpu", torch.float32, quick=True)


def test_runner_skips_without_cuda():
    """`make test-gpu` (tests/gpu/run.py) on a machine without a GPU: one line, exit 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "run.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("GPU lane skipped: no CUDA device") and len(r.stdout.strip().splitlines()) == 1
