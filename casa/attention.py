"""One attention primitive over packed segments, several backends with the same results.

    varlen_attention(q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D],
                     cu_seqlens_q [W+1], cu_seqlens_k [W+1], causal, backend) -> [Tq, H, D]

Segment w holds queries cu_q[w]:cu_q[w+1] and keys cu_k[w]:cu_k[w+1]. It covers packed SA
(cu_q == cu_k), CASA (keys = [image_w | text_w], causal), CA and the Q-Former (keys =
images, not causal). `causal` is *bottom-right aligned* per segment: query j of a segment
with Lq queries and Lk keys sees keys 0 .. Lk - Lq + j, so the queries are the last Lq
keys (flash-attn's convention, which is why an image must open its window):

    segment 0: Lq=2, Lk=5          segment 1: Lq=3, Lk=3
           k0 k1 k2 k3 k4                 k0 k1 k2
      q0   x  x  x  x  .            q0    x  .  .
      q1   x  x  x  x  x            q1    x  x  .
                                    q2    x  x  x

A query that sees no key (a segment without keys, or Lq > Lk) outputs zeros, never NaN.

Backends:
    dense  one masked softmax over the whole stream: the reference (tests only; O(Tq*Tk))
    sdpa   per-segment `scaled_dot_product_attention`: the CPU training path
    eager  explicit softmax, can return the probabilities (attention maps, Table 8 masks)
    flex   `flex_attention` with a block mask (GPU training; forward only on CPU)
    flash  `flash_attn_varlen_func` (CUDA with flash-attn installed)
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("dense", "sdpa", "eager", "flex", "flash")

_FLASH_FN: Callable | None = None
"""Override of `flash_attn.flash_attn_varlen_func` (tests substitute a CPU reference)."""


def set_flash_fn(fn: Callable | None) -> None:
    """Use `fn` (same signature and semantics as `flash_attn_varlen_func`) for the flash backend."""
    global _FLASH_FN
    _FLASH_FN = fn


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(name: str, device: torch.device | str, requires_grad: bool) -> None:
    """Raise ValueError naming the backends that can run here if `name` cannot."""
    device = torch.device(device)
    runnable = ["dense", "sdpa", "eager"]
    if device.type == "cuda" or not requires_grad:
        runnable.append("flex")
    if (device.type == "cuda" and _flash_available()) or _FLASH_FN is not None:
        runnable.append("flash")
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)}")
    if name not in runnable:
        why = {"flex": "flex_attention has no backward on CPU",
               "flash": "flash-attn needs CUDA and the flash-attn package"}[name]
        raise ValueError(f"backend={name!r} cannot run here ({why}); backends that can: {runnable}")


# ---------------------------------------------------------------------- masks
def segment_ids(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[W+1] -> (segment id [total], offset inside the segment [total])."""
    idx = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu.long(), idx, right=True) - 1
    return seg, idx - cu.long()[seg]


def dense_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, Tq: int, Tk: int, causal: bool,
               masked_key: torch.Tensor | None = None) -> torch.Tensor:
    """[Tq, Tk] bool: True where query i may see key j (block diagonal, bottom-right causal)."""
    sq, oq = segment_ids(cu_q, Tq)
    sk, ok = segment_ids(cu_k, Tk)
    mask = sq[:, None] == sk[None, :]
    if causal:
        lq = (cu_q[1:] - cu_q[:-1]).long()[sq]  # [Tq] segment query count
        lk = (cu_k[1:] - cu_k[:-1]).long()[sq]  # [Tq] segment key count
        mask &= ok[None, :] <= (lk - lq + oq)[:, None]
    if masked_key is not None:
        hide = masked_key >= 0
        mask[hide.nonzero().squeeze(-1), masked_key[hide]] = False
    return mask


def _expand_kv(k: torch.Tensor, H: int) -> torch.Tensor:
    """[T, Hkv, D] -> [T, H, D] (GQA: each key/value head serves H/Hkv query heads)."""
    return k if k.shape[1] == H else k.repeat_interleave(H // k.shape[1], dim=1)


# ---------------------------------------------------------------------- backends
def _dense(q, k, v, cu_q, cu_k, causal, scale, masked_key):
    H = q.shape[1]
    mask = dense_mask(cu_q, cu_k, q.shape[0], k.shape[0], causal, masked_key)  # [Tq, Tk]
    s = torch.einsum("qhd,khd->hqk", q, _expand_kv(k, H)) * scale  # [H, Tq, Tk]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return torch.einsum("hqk,khd->qhd", p, _expand_kv(v, H))


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    both = torch.stack([cu_q, cu_k]).tolist()  # one host sync per call
    return [(both[0][w], both[0][w + 1], both[1][w], both[1][w + 1]) for w in range(len(both[0]) - 1)]


def _segment_mask(lq: int, lk: int, device) -> torch.Tensor:
    """[lq, lk] bottom-right causal mask."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _sdpa(q, k, v, cu_q, cu_k, causal, scale):
    H = q.shape[1]
    outs = []
    for q0, q1, k0, k1 in _segments(cu_q, cu_k):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk == 0:  # no keys: zeros
            outs.append(q.new_zeros(lq, H, v.shape[-1]))
            continue
        qs = q[q0:q1].transpose(0, 1)  # [H, lq, D]
        ks = _expand_kv(k[k0:k1], H).transpose(0, 1)  # [H, lk, D]
        vs = _expand_kv(v[k0:k1], H).transpose(0, 1)
        if causal and lq == lk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        elif causal and lq > lk:
            # the first lq - lk queries see no key (zeros); the last lk form a square causal block
            o = F.scaled_dot_product_attention(qs[:, lq - lk:], ks, vs, is_causal=True, scale=scale)
            o = torch.cat([o.new_zeros(H, lq - lk, o.shape[-1]), o], dim=1)
        elif causal:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_segment_mask(lq, lk, q.device), scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        outs.append(o.transpose(0, 1))  # [lq, H, D]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _eager(q, k, v, cu_q, cu_k, causal, scale, masked_key, return_probs):
    H = q.shape[1]
    outs, probs = [], []
    for q0, q1, k0, k1 in _segments(cu_q, cu_k):
        lq, lk = q1 - q0, k1 - k0
        s = torch.einsum("qhd,khd->hqk", q[q0:q1], _expand_kv(k[k0:k1], H)) * scale  # [H, lq, lk]
        mask = _segment_mask(lq, lk, q.device) if causal else torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if masked_key is not None:
            mk = masked_key[q0:q1]
            rows = ((mk >= k0) & (mk < k1)).nonzero().squeeze(-1)
            mask = mask.clone()
            mask[rows, mk[rows] - k0] = False
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        outs.append(torch.einsum("hqk,khd->qhd", p, _expand_kv(v[k0:k1], H)))
        probs.append(p)
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    return (out, probs) if return_probs else out


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, cu_q, cu_k, causal, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not torch.is_grad_enabled():  # flex refuses CPU inputs that merely *could* need grads
        q, k, v = q.detach(), k.detach(), v.detach()
    Tq, H, D = q.shape
    Tk = k.shape[0]
    sq, oq = segment_ids(cu_q, Tq)
    sk, ok = segment_ids(cu_k, Tk)
    shift = ((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])).long()  # [W] Lk - Lq per segment

    def mask_mod(b, h, qi, ki):
        same = sq[qi] == sk[ki]
        return same & (ok[ki] <= oq[qi] + shift[sq[qi]]) if causal else same

    block = create_block_mask(mask_mod, None, None, Tq, Tk, device=q.device.type)
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    with warnings.catch_warnings():  # on CPU the unfused path is expected (ENVIRONMENT.md)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        o = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block, scale=scale,
               enable_gqa=k.shape[1] != H)  # [1, H, Tq, D]
    o = o[0].transpose(0, 1)  # [Tq, H, D]
    # flex leaves fully-masked rows undefined-but-finite: force the documented zeros
    visible = dense_mask(cu_q, cu_k, Tq, Tk, causal).any(-1) if Tq * Tk <= 1 << 24 else None
    return o * visible[:, None, None] if visible is not None else o


def _flash(q, k, v, cu_q, cu_k, causal, scale):
    fn = _FLASH_FN
    if fn is None:
        from flash_attn import flash_attn_varlen_func as fn
    lq, lk = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
    return fn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(lq.max()) if lq.numel() else 0,
              int(lk.max()) if lk.numel() else 0, dropout_p=0.0, softmax_scale=scale, causal=causal)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, causal: bool, backend: str = "sdpa", *, scale: float | None = None,
                     masked_key: torch.Tensor | None = None, return_probs: bool = False):
    """Attention over packed segments (see the module docstring).

    masked_key [Tq] int64: one key (global index into k) hidden from each query, -1 = none
        (paper Table 8 masks; dense and eager only).
    return_probs: eager only; also returns one [H, Lq_w, Lk_w] probability tensor per segment.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} differ")
    check_backend(backend, q.device, torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if masked_key is not None and backend not in ("dense", "eager"):
        raise ValueError(f"masked_key needs backend 'dense' or 'eager', not {backend!r}")
    if return_probs and backend != "eager":
        raise ValueError(f"return_probs needs backend 'eager', not {backend!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "dense":
        return _dense(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, masked_key)
    if backend == "sdpa":
        return _sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    if backend == "eager":
        return _eager(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, masked_key, return_probs)
    if backend == "flex":
        return _flex(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    return _flash(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
