"""Test tools: a strict CPU stand-in for flash-attn (its input contract checked, sdpa
underneath) and a counter of host syncs. The tiny model builders are `casa.tiny`.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

# ---------------------------------------------------------------------- flash-attn stand-in
FLASH_MAX_HEAD_DIM = 256
"""flash-attn 2's forward supports head dims up to 256 (its Python wrapper pads D to a multiple of 8)."""


def strict_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                  softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                  alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """`flash_attn.flash_attn_varlen_func` on any device: its signature, and the input contract
    its kernel enforces (flash-attn 2, `csrc/flash_attn/flash_api.cpp`, `mha_varlen_fwd`),
    checked first; then the dense reference, computed in fp32 and returned in q's dtype.

    q [Tq, H, D], k, v [Tk, Hkv, D]: fp16 or bf16 only, all three one dtype, on one device,
    contiguous last dim, D <= 256, H a multiple of Hkv; cu_seqlens_q / _k [B+1] int32,
    contiguous, on q's device, rising from 0 to Tq / Tk; max_seqlen_q / _k Python ints no
    smaller than the longest segment (the real kernel sizes its grid with them and would
    silently skip the rest). Features casa never uses (dropout, sliding windows, softcap,
    ALiBi, paged KV, returned probabilities) are refused rather than ignored.

    Its own checks read the device (`.tolist()`), which the real kernel does not: they run
    inside `SyncCounter.paused()`, so sync counts see only the caller's syncs."""
    from casa.attention import FLASH_DTYPES, varlen_attention

    with SyncCounter.paused():
        bad = []
        if q.dtype not in FLASH_DTYPES:
            bad.append(f"FlashAttention only supports fp16 and bf16 data types, got q {q.dtype}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            bad.append(f"query, key and value must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if t.dtype != torch.int32:
                bad.append(f"{name} must have dtype int32, got {t.dtype}")
            if t.device != q.device:
                bad.append(f"{name} must be on q's device {q.device}, got {t.device}")
            if t.dim() != 1 or not t.is_contiguous():
                bad.append(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3:
                bad.append(f"{name} must be [total, heads, head_dim], got shape {tuple(t.shape)}")
            elif t.stride(-1) != 1:
                bad.append(f"{name}: input tensor must have contiguous last dimension")
            if t.device != q.device:
                bad.append(f"{name} must be on q's device {q.device}, got {t.device}")
        for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if type(n) is not int:
                bad.append(f"{name} must be a Python int, got {type(n).__name__}")
        if bad:
            raise RuntimeError("flash_attn_varlen_func: " + "; ".join(bad))
        H, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
        if D > FLASH_MAX_HEAD_DIM or k.shape[2] != D or v.shape != k.shape:
            raise RuntimeError(f"flash_attn_varlen_func: head dim {D} must be <= {FLASH_MAX_HEAD_DIM} and shared by "
                               f"q, k, v (k {tuple(k.shape)}, v {tuple(v.shape)})")
        if H % Hkv:
            raise RuntimeError(f"flash_attn_varlen_func: number of heads in key/value ({Hkv}) must divide number "
                               f"of heads in query ({H})")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise RuntimeError(f"flash_attn_varlen_func: cu_seqlens_k must have shape ({cu_seqlens_q.numel()},), "
                               f"got {tuple(cu_seqlens_k.shape)}")
        if dropout_p != 0.0 or tuple(window_size) != (-1, -1) or softcap != 0.0 or alibi_slopes is not None \
                or return_attn_probs or block_table is not None:
            raise RuntimeError("flash_attn_varlen_func stand-in: dropout, window_size, softcap, alibi_slopes, "
                               "return_attn_probs and block_table are not used by casa")
        lq = cu_seqlens_q.diff().tolist()
        lk = cu_seqlens_k.diff().tolist()
        if max(lq, default=0) > max_seqlen_q or max(lk, default=0) > max_seqlen_k:
            raise RuntimeError(f"flash_attn_varlen_func: max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k} "
                               f"below the longest segments ({max(lq, default=0)}, {max(lk, default=0)})")
        with torch.autocast(q.device.type, enabled=False):
            out = varlen_attention(q.float(), k.float(), v.float(), cu_seqlens_q, cu_seqlens_k, causal, "dense",
                                   scale=softmax_scale)
    return out.to(q.dtype)


def strict_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                   cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                   rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                   return_softmax_lse=False):
    """`flash_attn.flash_attn_with_kvcache` on any device: its signature, the input contract
    its kernel enforces (`csrc/flash_attn/flash_api.cpp`, `mha_fwd_kvcache`) checked first,
    then what it does: k, v (if given) written into the caches at cache_seqlens *in place*,
    and the dense reference over cache[b, :cache_seqlens[b] + Sk_new] (bottom-right causal),
    computed in fp32 and returned in q's dtype.

    q [B, Sq, H, D]; k_cache, v_cache [B, cap, Hkv, D]; k, v [B, Sk_new, Hkv, D] or both None;
    fp16 / bf16 only, one dtype, one device, contiguous last dim, D <= 256, H a multiple of
    Hkv; cache_seqlens int32 [B] on q's device (or a Python int), with room in the cache for
    the new keys. Features casa never uses (rotary, cache_batch_idx, cache_leftpad,
    block_table, window_size, softcap, ALiBi, num_splits, the returned LSE) are refused.
    Its own checks read the device, which the real kernel does not: they run inside
    `SyncCounter.paused()`."""
    from casa.attention import FLASH_DTYPES, varlen_attention

    with SyncCounter.paused():
        bad = []
        if (k is None) != (v is None):
            bad.append("k and v must be given together")
        named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)] + ([("k", k), ("v", v)] if k is not None else [])
        for name, t in named:
            if t.dim() != 4:
                bad.append(f"{name} must be [batch, seqlen, heads, head_dim], got shape {tuple(t.shape)}")
            elif t.stride(-1) != 1:
                bad.append(f"{name}: input tensor must have contiguous last dimension")
            if t.dtype not in FLASH_DTYPES:
                bad.append(f"FlashAttention only supports fp16 and bf16 data types, got {name} {t.dtype}")
            elif t.dtype != q.dtype:
                bad.append(f"query and {name} must have the same dtype, got {q.dtype} and {t.dtype}")
            if t.device != q.device:
                bad.append(f"{name} must be on q's device {q.device}, got {t.device}")
        if bad:
            raise RuntimeError("flash_attn_with_kvcache: " + "; ".join(bad))
        B, Sq, H, D = q.shape
        _, cap, Hkv, _ = k_cache.shape
        if k_cache.shape[0] != B or v_cache.shape != k_cache.shape or k_cache.shape[3] != D:
            raise RuntimeError(f"flash_attn_with_kvcache: k_cache and v_cache must be [batch={B}, cap, Hkv, D={D}], "
                               f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        if D > FLASH_MAX_HEAD_DIM:
            raise RuntimeError(f"flash_attn_with_kvcache: head dim {D} must be <= {FLASH_MAX_HEAD_DIM}")
        if H % Hkv:
            raise RuntimeError(f"flash_attn_with_kvcache: number of heads in key/value ({Hkv}) must divide number "
                               f"of heads in query ({H})")
        new = 0
        if k is not None:
            new = k.shape[1]
            if k.shape != (B, new, Hkv, D) or v.shape != k.shape:
                raise RuntimeError(f"flash_attn_with_kvcache: k and v must be [{B}, seqlen_new, {Hkv}, {D}], got "
                                   f"{tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            lens = [cap - new] * B  # the whole cache is valid
        elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
            lens = [cache_seqlens] * B
        elif isinstance(cache_seqlens, torch.Tensor):
            if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,) \
                    or cache_seqlens.device != q.device or not cache_seqlens.is_contiguous():
                raise RuntimeError(f"flash_attn_with_kvcache: cache_seqlens must be a contiguous int32 [{B}] on "
                                   f"{q.device}, got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)} on "
                                   f"{cache_seqlens.device}")
            lens = cache_seqlens.tolist()
        else:
            raise RuntimeError(f"flash_attn_with_kvcache: cache_seqlens must be an int32 tensor or int, got "
                               f"{type(cache_seqlens).__name__}")
        if any(n < 0 or n + new > cap for n in lens):
            raise RuntimeError(f"flash_attn_with_kvcache: cache_seqlens {lens} + {new} new keys do not fit a cache "
                               f"of {cap} rows")
        if rotary_cos is not None or rotary_sin is not None or cache_batch_idx is not None \
                or cache_leftpad is not None or block_table is not None or tuple(window_size) != (-1, -1) \
                or softcap != 0.0 or alibi_slopes is not None or num_splits != 0 or return_softmax_lse:
            raise RuntimeError("flash_attn_with_kvcache stand-in: rotary_cos/sin, cache_batch_idx, cache_leftpad, "
                               "block_table, window_size, softcap, alibi_slopes, num_splits and return_softmax_lse "
                               "are not used by casa")
        outs = []
        for b, n in enumerate(lens):
            if k is not None:  # the kernel's in-place append
                k_cache[b, n:n + new] = k[b]
                v_cache[b, n:n + new] = v[b]
            lk = n + new
            cu_q = torch.tensor([0, Sq], dtype=torch.int32, device=q.device)
            cu_k = torch.tensor([0, lk], dtype=torch.int32, device=q.device)
            with torch.autocast(q.device.type, enabled=False):
                outs.append(varlen_attention(q[b].float(), k_cache[b, :lk].float(), v_cache[b, :lk].float(), cu_q,
                                             cu_k, causal, "dense", scale=softmax_scale))
    return torch.stack(outs).to(q.dtype) if outs else q.new_zeros(q.shape)  # [B, Sq, H, D]


@contextmanager
def flash_stand_in(fn=None, kvcache_fn=None, *, model: torch.nn.Module | None = None):
    """Inside, casa's `flash` backend runs `fn` (default `strict_flash_attn_varlen_func`) and,
    for its batched decoding step, `kvcache_fn` (default `strict_flash_attn_with_kvcache`):
    flash backends built inside take them (`casa.attention.flash_kernels`), and those `model`
    already holds are pointed at them until the block ends (the kernels are injected into each
    `FlashBackend`; nothing is routed through a global at call time)."""
    from casa.attention import FlashBackend, flash_kernels

    kernels = (fn or strict_flash_attn_varlen_func, kvcache_fn or strict_flash_attn_with_kvcache)
    bound = [] if model is None else [(m, name, b) for m in model.modules() for name, b in vars(m).items()
                                      if isinstance(b, FlashBackend)]
    for m, name, _ in bound:
        vars(m)[name] = FlashBackend(*kernels)
    try:
        with flash_kernels(*kernels):
            yield
    finally:
        for m, name, b in bound:
            vars(m)[name] = b


# ---------------------------------------------------------------------- host syncs
def _caller() -> str:
    """file:line of the innermost frame outside torch and this file (who asked for the value)."""
    frame = sys._getframe(1)
    while frame is not None and (f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return "?" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


class SyncCounter:
    """Counts the operations that make the host wait for a CUDA device, on any device (CPU
    included). Use as a context manager; after it, `count` and `where` ("op at file:line",
    the line being the innermost caller outside torch and this file):

        with SyncCounter() as syncs:
            model(batch).loss.backward()
        assert syncs.count == ..., syncs.where

    Counted, by the name in `where`:
    - value reads called from Python: `item`, `tolist`, `__bool__` / `__int__` / `__float__` /
      `__index__` of a tensor, `numpy` (on CUDA, the `.cpu()` before it);
    - at the dispatcher, so also inside C++ code and autograd's backward: `_local_scalar_dense`
      (a value read made in C++, e.g. a tensor passed where an int is taken), and ops whose
      output size depends on the data: `nonzero`, `masked_select`, `unique*`, `index[bool]`
      (indexing with a bool mask), `repeat_interleave` with tensor repeats and no `output_size`.

    On CUDA `torch.cuda.set_sync_debug_mode` is the ground truth (`tests/gpu/checks.py`'s
    `count_cuda_syncs`, which fills a `SyncCounter`'s `where` from its warnings); this is the
    CPU proxy for it. Code that reads the device on purpose where the real kernel would not
    (a stand-in's own validation) runs inside `SyncCounter.paused()`."""

    _paused = 0
    READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"})
    """Tensor methods read from Python (one sync each; what they dispatch is not counted again)."""
    SIZED_BY_DATA = frozenset({"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                               "unique_dim"})

    def __init__(self):
        self.where: list[str] = []

    @property
    def count(self) -> int:
        return len(self.where)

    @classmethod
    @contextmanager
    def paused(cls):
        """Inside: no `SyncCounter` counts anything."""
        cls._paused += 1
        try:
            yield
        finally:
            cls._paused -= 1

    def _add(self, op: str) -> None:
        self.where.append(f"{op} at {_caller()}")

    def __enter__(self) -> "SyncCounter":
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in SyncCounter.READS and not SyncCounter._paused:
                    counter._add(name)
                    with SyncCounter.paused():  # its `_local_scalar_dense` / element reads are this one sync
                        return func(*args, **(kwargs or {}))
                return func(*args, **(kwargs or {}))

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                kwargs = kwargs or {}
                if not SyncCounter._paused:
                    if name in SyncCounter.SIZED_BY_DATA or name == "_local_scalar_dense":
                        counter._add(name)
                    elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                 for i in (args[1] if len(args) > 1 else ())):
                        counter._add("index[bool]")
                    elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
                            and kwargs.get("output_size") is None:
                        counter._add("repeat_interleave")
                return func(*args, **kwargs)

        self._modes = [_Function(), _Dispatch()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
