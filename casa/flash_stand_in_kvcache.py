"""A strict CPU stand-in for `flash_attn.flash_attn_with_kvcache` (flash-attn 2.x), the kernel
of `flash`'s batched decoding step (`casa.attention.CachedKV`, `casa.cache`).

`casa.attention` routes to it whenever a `set_flash_fn` stand-in is set (e.g.
`casa.testing.flash_stand_in`) and no other is given with `set_flash_kvcache_fn`;
`flash_kvcache_stand_in(fn)` routes both to spies.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


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
    from casa.testing import FLASH_MAX_HEAD_DIM, SyncCounter

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
def flash_kvcache_stand_in(varlen_fn=None, kvcache_fn=None):
    """Route casa's `flash` backend to `varlen_fn` (default the strict varlen stand-in) and its
    batched decoding step to `kvcache_fn` (default `strict_flash_attn_with_kvcache`) inside."""
    from casa.attention import set_flash_fn, set_flash_kvcache_fn
    from casa.testing import strict_flash_attn_varlen_func

    set_flash_fn(varlen_fn or strict_flash_attn_varlen_func)
    set_flash_kvcache_fn(kvcache_fn or strict_flash_attn_with_kvcache)
    try:
        yield
    finally:
        set_flash_fn(None)
        set_flash_kvcache_fn(None)
