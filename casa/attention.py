"""One attention primitive over packed segments, several backends with the same results.

    varlen_attention(q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D],
                     cu_seqlens_q [W+1] int32, cu_seqlens_k [W+1] int32, causal, backend)
        -> out [Tq, H, D]

Segment w holds queries cu_q[w]:cu_q[w+1] and keys cu_k[w]:cu_k[w+1]. One primitive covers
packed self-attention (cu_q == cu_k), CASA (keys = [image_w | text_w], causal), cross-
attention and the Q-Former (keys = image tokens, not causal). GQA: H is a multiple of Hkv
and query head h reads key/value head h // (H / Hkv).

`causal` is *bottom-right aligned* per segment: query j of a segment with Lq queries and Lk
keys sees keys 0 .. Lk - Lq + j, i.e. the queries are the last Lq keys. This is flash-attn's
convention, and it is why CASA puts a window's image tokens *before* its text tokens: every
text token then sees the whole image and the text before it. Two segments,
(Lq=2, Lk=5) = 3 image + 2 text tokens, and (Lq=3, Lk=3) = a window without image:

    segment 0: Lq=2, Lk=5              segment 1: Lq=3, Lk=3
             k0 k1 k2 k3 k4                     k5 k6 k7
        q0   x  x  x  x  .                q2    x  .  .
        q1   x  x  x  x  x                q3    x  x  .
                                          q4    x  x  x
    (the whole [Tq=5, Tk=8] mask is block diagonal: q0..q1 never see k5..k7, etc.)

Edge cases are legal and give zeros, never NaN, with finite gradients: a segment with
queries but no keys, and, when Lq > Lk under `causal`, the first Lq - Lk queries (they see
no key). A segment with keys but no queries contributes nothing.

Backends (all equal to `dense` to 1e-5 in fp32, tests/test_attention.py):
    dense  one masked softmax over the whole stream: the reference, O(Tq * Tk) memory
    sdpa   loop of per-segment `scaled_dot_product_attention`: the CPU training path; on the
           cache's decoding path (`DecodeKV`, no gradients), segments of at most
           DECODE_MAX_QUERIES queries take an explicit softmax with GQA folded into the query
           axis (`_decode_segment`)
    eager  explicit per-segment softmax; returns the probabilities (attention maps, Fig. 7)
    flex   `flex_attention` with a block mask from segment ids (GPU; forward only on CPU)
    flash  `flash_attn_varlen_func` (CUDA with the flash-attn package): fp16/bf16 only, fp32
           inputs go down to the autocast dtype (`flash_dtype`); its kernels are injected
           (`FlashBackend`): tests run it through the strict stand-ins of `tests.builders`
Each is an `AttentionBackend` object: a layer resolves its backend once, when it is built
(`make_backend`), and calls that object; `varlen_attention(..., backend=name)` resolves a
name per call (tests, benchmarks).
`masked_key` (paper Table 8 "-self"/"-rnd" inference masks) is supported by dense and eager.

Keys and values may also come as *segmented* sequences, one tensor [Lk_w, Hkv, D] per
segment (`casa.cache` passes each cached sample's buffer this way): `sdpa` and `eager` read
them in place, the whole-stream backends (dense, flex, flash) concatenate them first.
A decoding step of a several-sample cache under `flash` instead hands over the cache itself
(`CachedKV`: one [S, capacity, Hkv, D] buffer per layer, `flash_attn_with_kvcache`).
The cache's own decoding path is explicit: one sample's head-major buffers come as `DecodeKV`.
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("dense", "sdpa", "eager", "flex", "flash")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
"""What flash-attn takes (fp16 / bf16 only; `tests.builders.strict_flash_attn_varlen_func`)."""

_FLASH_KERNELS: tuple[Callable, Callable] | None = None
"""Kernels a `flash` backend built without explicit ones takes (`flash_kernels`); None: flash-attn's.
Read only when a backend is built (`make_backend`), never per call."""


@contextmanager
def flash_kernels(varlen_fn: Callable, kvcache_fn: Callable):
    """Inside: `flash` backends built without explicit kernels take these (same signatures and
    semantics as `flash_attn.flash_attn_varlen_func` / `flash_attn_with_kvcache`), e.g. the CPU
    stand-ins of `tests.builders.flash_stand_in`. Backends built before or after are unaffected."""
    global _FLASH_KERNELS
    before, _FLASH_KERNELS = _FLASH_KERNELS, (varlen_fn, kvcache_fn)
    try:
        yield
    finally:
        _FLASH_KERNELS = before


@dataclass
class CachedKV:
    """The keys and values of a `flash` decoding step over a several-sample cache
    (`casa.cache.KVCache`), passed as both k and v of `varlen_attention`:

        k_cache, v_cache [B, cap, Hkv, D]  row b holds sample b's cached keys in [:cache_seqlens[b]]
        cache_seqlens    [B] int32 on the queries' device: keys cached before this step
        k, v             [B, m, Hkv, D] the step's new keys: `flash_attn_with_kvcache` writes them
                         into the cache at cache_seqlens in place, then attends over
                         cache[b, :cache_seqlens[b] + m] (bottom-right causal)

    The queries are [B * m, H, D], m per sample: every sample has the same number of new
    tokens (the cache takes the varlen path otherwise)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class DecodeKV:
    """Keys and values of a cached decoding step that `casa.cache` stores head-major (one
    sample's buffers, keys transposed: `KVCache._append`), passed as both k and v of
    `varlen_attention`: the explicit decoding path. `sdpa` then sends each segment of at most
    `DECODE_MAX_QUERIES` queries (and at least as many keys) to `_decode_segment`, which reads
    these strided views in place; the other backends read k, v as given.

        k, v   [Tk, Hkv, D] or segmented (one [Lk_w, Hkv, D] per segment, `Keys`)"""

    k: "Keys"
    v: "Keys"


@lru_cache(maxsize=1)
def _flash_installed() -> bool:
    # find_spec, not import: checked when a flash backend is built, and a failing import is slow
    return importlib.util.find_spec("flash_attn") is not None


# ---------------------------------------------------------------------- masks
def segment_ids(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu [W+1], total -> (segment id [total], offset inside the segment [total]), on device."""
    idx = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu.long(), idx, right=True) - 1  # right=True skips empty segments
    return seg, idx - cu.long()[seg]


def dense_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, Tq: int, Tk: int, causal: bool,
               masked_key: torch.Tensor | None = None) -> torch.Tensor:
    """-> [Tq, Tk] bool, True where query i may see key j (block diagonal, bottom-right causal,
    minus each query's `masked_key`)."""
    sq, oq = segment_ids(cu_q, Tq)
    sk, ok = segment_ids(cu_k, Tk)
    mask = sq[:, None] == sk[None, :]  # [Tq, Tk]
    if causal:
        shift = ((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])).long()  # [W] Lk - Lq
        mask &= ok[None, :] <= (shift[sq] + oq)[:, None]
    if masked_key is not None:
        rows = (masked_key >= 0).nonzero().squeeze(-1)
        mask[rows, masked_key[rows]] = False
    return mask


def _segment_mask(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """-> [lq, lk] bool bottom-right causal mask of one segment."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s [..., Lq, Lk] scores, mask [Lq, Lk] -> probabilities, 0 on rows without a visible key.

    A finite fill instead of -inf keeps every intermediate finite (a -inf row would give NaN
    forward and NaN gradients); exp(min - rowmax) is exactly 0, so partially masked rows are
    unchanged, and the final `* mask` turns the uniform softmax of a fully masked row into 0.
    """
    filled = s.float().masked_fill(~mask, torch.finfo(torch.float32).min)  # fp32 softmax for bf16 inputs
    return (torch.softmax(filled, dim=-1) * mask).to(s.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] with a contiguous last dim, copied only if it has none: fused kernels (SDPA,
    flex, flash-attn) need one, and `casa.cache` stores keys transposed for decoding."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _expand_kv(x: torch.Tensor, H: int) -> torch.Tensor:
    """[T, Hkv, D] -> [T, H, D]: each key/value head serves H / Hkv consecutive query heads."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor, Tq: int, Tk: int) -> list[tuple[int, int, int, int]]:
    """-> [(q0, q1, k0, k1)] per segment, validated. One host sync: a single `.tolist()`."""
    bq, bk = torch.stack([cu_q, cu_k]).tolist()  # [2, W+1]
    for name, b, total in (("cu_seqlens_q", bq, Tq), ("cu_seqlens_k", bk, Tk)):
        if b[0] != 0 or b[-1] != total or any(b1 < b0 for b0, b1 in zip(b, b[1:])):
            raise ValueError(f"{name}={b} must rise from 0 to the token count {total}")
    return [(bq[w], bq[w + 1], bk[w], bk[w + 1]) for w in range(len(bq) - 1)]


Keys = torch.Tensor | Sequence[torch.Tensor]
"""[Tk, Hkv, D], or one [Lk_w, Hkv, D] per segment (segmented: no concatenation needed)."""


def _split(q: torch.Tensor, k: Keys, v: Keys, segs: list[tuple[int, int, int, int]]):
    """Per-segment views of q, k, v via `torch.split`, whose backward is one concatenation.
    Slicing each segment instead (`q[q0:q1]`) gives every segment's backward a zero-filled
    gradient of the whole tensor: O(W * T) time, 9x the ideal at 64 windows
    (docs/benchmarks.md, `attention`). Segmented keys are already per segment."""
    lq = [q1 - q0 for q0, q1, _, _ in segs]
    if not isinstance(k, torch.Tensor):
        _check_lengths(k, [k1 - k0 for _, _, k0, k1 in segs])
        return q.split(lq), k, v
    lk = [k1 - k0 for _, _, k0, k1 in segs]
    return q.split(lq), k.split(lk), v.split(lk)


def _num_keys(k: Keys) -> int:
    return k.shape[0] if isinstance(k, torch.Tensor) else sum(x.shape[0] for x in k)


def _check_segmented(k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], W: int) -> None:
    """Segmented keys/values: W pairs of [Lk_w, Hkv, D], Hkv and D as segment 0's. Shapes
    only: the lengths are checked against cu_seqlens_k where it is read anyway (`_check_lengths`),
    so that a decoding step keeps its one host sync."""
    if len(k) != W or len(v) != W or not W:
        raise ValueError(f"segmented keys/values need one tensor per segment: {W} segments (cu_seqlens_k), "
                         f"got {len(k)} keys and {len(v)} values")
    first = k[0]
    for w, (kw, vw) in enumerate(zip(k, v)):
        if kw.dim() != 3 or kw.shape != vw.shape or kw.shape[1:] != first.shape[1:]:
            raise ValueError(f"segment {w}: keys {tuple(kw.shape)} and values {tuple(vw.shape)} must both be "
                             f"[Lk_{w}, {first.shape[1]}, {first.shape[2]}] (segment 0's heads and head dim)")


def _check_lengths(k: Sequence[torch.Tensor], lens: list[int]) -> None:
    for w, (kw, n) in enumerate(zip(k, lens)):
        if kw.shape[0] != n:
            raise ValueError(f"segment {w}: {kw.shape[0]} keys where cu_seqlens_k says {n}")


# ---------------------------------------------------------------------- backends
def _dense(q, k, v, cu_q, cu_k, causal, scale, masked_key):
    """The reference: every query against every key, masked. [Tq, H, D] -> [Tq, H, D]."""
    _segments(cu_q, cu_k, q.shape[0], k.shape[0])  # validation only
    H = q.shape[1]
    mask = dense_mask(cu_q, cu_k, q.shape[0], k.shape[0], causal, masked_key)  # [Tq, Tk]
    s = torch.einsum("qhd,khd->hqk", q, _expand_kv(k, H)) * scale  # [H, Tq, Tk]
    p = _masked_softmax(s, mask).to(v.dtype)  # [H, Tq, Tk]
    return torch.einsum("hqk,khd->qhd", p, _expand_kv(v, H))  # [Tq, H, D]


DECODE_MAX_QUERIES = 8
"""`sdpa` without gradients: a segment with at most this many queries (and at least as many
keys) takes `_decode_segment`, whose fp32 scores [H, lq, lk] are then at most
8 H / (2 Hkv D) of the segment's fp32 K/V bytes (demo model, 4 heads over 2 KV heads, D = 32:
3 % at lq = 1, 25 % at lq = 8)."""


def _decode_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                    workspace: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Few queries over many keys, no gradients: q [lq, H, D], k, v [lk, Hkv, D], lk >= lq > 0
    -> [lq, H, D].

    A decoding step against a long KV cache (lq = 1, or a chunk of a few new tokens). Through
    SDPA (mask + `enable_gqa`) this was the part of a live-captioning frame that grew with the
    transcript (docs/benchmarks.md, `stream`). Here the G = H / Hkv query heads that share a KV
    head are folded into the query axis, so one batched matmul reads each KV head once, in
    place: k and v may be strided views of a cache buffer (`casa.cache` stores them head-major,
    keys transposed, the layout these two matmuls read fastest). Only the last lq - 1 keys need
    a mask, and the softmax writes its output over the scores: one O(lk) temporary per call,
    not two (each costs fresh page faults when the allocator returns large blocks to the OS,
    as it does in the `stream` suite)."""
    lq, H, D = q.shape
    lk, Hkv = k.shape[:2]
    G = H // Hkv  # query heads per KV head: head h reads KV head h // G
    qf = (q * scale).view(lq, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * lq, D)  # [Hkv, G*lq, D], row g*lq + j
    kt = k.permute(1, 2, 0)  # [Hkv, D, lk]
    if workspace is not None and q.dtype == torch.float32:
        # the scores are the one O(lk) temporary of a decoding step: kept in a buffer the
        # caller reuses across steps, instead of fresh memory (and fresh pages) every call
        s = torch.bmm(qf, kt, out=workspace(Hkv * G * lq * lk, q).view(Hkv, G * lq, lk))
    else:
        s = torch.bmm(qf, kt).float()  # [Hkv, G*lq, lk] scaled scores; fp32 softmax for bf16 inputs
    if causal and lq > 1:
        # bottom-right: query j sees keys 0 .. lk - lq + j, so of the last lq - 1 keys
        # (lk - lq + 1 + c, c = 0 .. lq - 2) it misses those with c >= j
        tail = s.view(Hkv, G, lq, lk)[..., lk - lq + 1:]  # [Hkv, G, lq, lq - 1]
        tail.masked_fill_(torch.ones(lq, lq - 1, dtype=torch.bool, device=q.device).triu_(), float("-inf"))
    p = torch.softmax(s, dim=-1, out=s).to(v.dtype)  # every row sees >= 1 key (lk >= lq): no NaN
    o = torch.bmm(p, v.transpose(0, 1))  # [Hkv, G*lq, D]
    return o.view(Hkv, G, lq, D).permute(2, 0, 1, 3).reshape(lq, H, D)  # [lq, H, D]


def _sdpa(q, k, v, cu_q, cu_k, causal, scale, grad, workspace=None, decode=False):
    """One fused SDPA per segment: O(Lq * Lk) per segment instead of O(Tq * Tk).

    Inputs get a batch dim of 1: with 3-D inputs PyTorch's CPU dispatcher falls back to the
    math path, which materialises the [H, Lq, Lk] scores (docs/benchmarks.md, `attention`).
    On the cache's decoding path (`decode`: keys came as `DecodeKV`) and without gradients
    (`grad` False), short query segments go to `_decode_segment`."""
    Tq, H, D = q.shape
    gqa = (k if isinstance(k, torch.Tensor) else k[0]).shape[1] != H  # SDPA broadcasts kv heads itself
    outs = []
    segs = _segments(cu_q, cu_k, Tq, _num_keys(k))
    for (q0, q1, k0, k1), qw, kw, vw in zip(segs, *_split(q, k, v, segs)):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk == 0:  # SDPA would return NaN rows
            outs.append(q.new_zeros(lq, H, D))
            continue
        # only on keys the cache stores head-major (`DecodeKV`: a one-sample cache's buffers):
        # on token-major keys (a cache of several samples, a training stream) the permuted
        # matmul is slower than SDPA at D = 128 (layer suite: generation 1.6-1.7x)
        if decode and not grad and lq <= DECODE_MAX_QUERIES and lk >= lq:
            outs.append(_decode_segment(qw, kw, vw, causal, scale, workspace))
            continue
        qs = qw.transpose(0, 1)[None]  # [1, H, lq, D]
        ks, vs = _rows(kw.transpose(0, 1)[None]), _rows(vw.transpose(0, 1)[None])  # [1, Hkv, lk, D]
        if not causal:
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=gqa)
        elif lq == lk:  # SDPA's is_causal is top-left aligned, which equals bottom-right here
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        elif lq > lk:
            # the first lq - lk queries see no key (zeros; SDPA would give NaN), the last lk
            # queries and the lk keys form a square causal block
            o = F.scaled_dot_product_attention(qs[:, :, lq - lk:], ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            o = torch.cat([o.new_zeros(1, H, lq - lk, o.shape[-1]), o], dim=2)  # [1, H, lq, D]
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_segment_mask(lq, lk, q.device), scale=scale,
                                               enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))  # [lq, H, D]
    return torch.cat(outs) if outs else q.new_zeros(Tq, H, D)


def _eager(q, k, v, cu_q, cu_k, causal, scale, masked_key, return_probs):
    """Explicit per-segment softmax; probs [H, Lq_w, Lk_w] per segment when asked."""
    Tq, H, D = q.shape
    outs, probs = [], []
    segs = _segments(cu_q, cu_k, Tq, _num_keys(k))
    for (q0, q1, k0, k1), qw, kw, vw in zip(segs, *_split(q, k, v, segs)):
        lq, lk = q1 - q0, k1 - k0
        s = torch.einsum("qhd,khd->hqk", qw, _expand_kv(kw, H)) * scale  # [H, lq, lk]
        if causal:
            mask = _segment_mask(lq, lk, q.device)  # [lq, lk]
        else:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if masked_key is not None:  # Table 8: hide one key per query; out-of-segment indices hide nothing
            mk = masked_key[q0:q1]
            rows = ((mk >= k0) & (mk < k1)).nonzero().squeeze(-1)
            mask[rows, mk[rows] - k0] = False
        p = _masked_softmax(s, mask).to(vw.dtype)  # [H, lq, lk]
        outs.append(torch.einsum("hqk,khd->qhd", p, _expand_kv(vw, H)))  # [lq, H, D]
        probs.append(p)
    out = torch.cat(outs) if outs else q.new_zeros(Tq, H, D)
    return (out, probs) if return_probs else out


@lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # compiled once per process: eager flex materialises the scores, compiled flex is fused
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, cu_q, cu_k, causal, scale):
    """flex_attention over the whole stream with a block mask from per-token segment ids."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Tq, H, _ = q.shape
    Tk = k.shape[0]
    _segments(cu_q, cu_k, Tq, Tk)  # validation; create_block_mask syncs anyway
    if Tq == 0 or Tk == 0:  # flex cannot reduce over an empty key axis
        return q.new_zeros(Tq, H, v.shape[-1])
    if not torch.is_grad_enabled():  # CPU flex refuses inputs that merely *could* need grads
        q, k, v = q.detach(), k.detach(), v.detach()
    k, v = _rows(k), _rows(v)
    sq, oq = segment_ids(cu_q, Tq)  # [Tq], [Tq]
    sk, ok = segment_ids(cu_k, Tk)  # [Tk], [Tk]
    shift = ((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])).long()  # [W] Lk - Lq: bottom-right offset

    def mask_mod(b, h, qi, ki):
        same = sq[qi] == sk[ki]
        return same & (ok[ki] <= oq[qi] + shift[sq[qi]]) if causal else same

    block = create_block_mask(mask_mod, None, None, Tq, Tk, device=q.device)
    fn = flex_attention if q.device.type == "cpu" else _compiled_flex()  # no compile on CPU (ENVIRONMENT.md)
    with warnings.catch_warnings():  # the unfused CPU path is intended here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        o = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # [1, H(kv), T, D]
               block_mask=block, scale=scale, enable_gqa=k.shape[1] != H)  # [1, H, Tq, D]
    o = o[0].transpose(0, 1)  # [Tq, H, D]
    # rows that see no key must be zero whatever flex leaves there; O(Tq), no [Tq, Tk] mask
    visible = (cu_k[1:] - cu_k[:-1]).long()[sq] > 0  # [Tq] segment has keys
    if causal:
        visible &= oq + shift[sq] >= 0  # key 0 is within reach
    return torch.where(visible[:, None, None], o, 0.0)


def flash_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype `flash` runs inputs of `dtype` in: their own if half precision, else the
    autocast dtype when autocast is on with a half dtype (as Hugging Face's flash path does).
    Raises ValueError naming the settings that give half precision otherwise."""
    if dtype in FLASH_DTYPES:
        return dtype
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in FLASH_DTYPES:
        return torch.get_autocast_dtype(device_type)
    raise ValueError(f"backend='flash' takes {[str(d) for d in FLASH_DTYPES]} inputs, got {dtype}: run it under "
                     f"trainer.precision in ['bf16-mixed', '16-mixed', 'bf16-true'], or FSDP2 with "
                     f"model.fsdp_param_dtype in ['bfloat16', 'float16'], or Backbone.dtype in ['bfloat16', 'float16']")


def half_precision_modules(model: torch.nn.Module) -> dict[str, str]:
    """{module name: what it runs} for the modules of `model` whose attention kernel takes fp16 /
    bf16 only: casa backends set to `flash` (`attn_backend` / `backend` attributes of blocks,
    fusion and Q-Former layers) and Hugging Face modules configured with `flash_attention_2`
    (the vision tower). `experiments.fit` checks these against the precision at startup."""
    found = {}
    for name, m in model.named_modules():
        if "flash" in (getattr(m, "attn_backend", None), getattr(m, "backend", None)):
            found[name] = "backend='flash'"
        elif getattr(getattr(m, "config", None), "_attn_implementation", None) == "flash_attention_2":
            found[name] = "attn_implementation='flash_attention_2'"
    return found


def _flash(fn: Callable, q, k, v, cu_q, cu_k, causal, scale, max_q: int | None, max_k: int | None):
    """fn = flash_attn_varlen_func: bottom-right causal and GQA are native, keyless rows give 0.

    max_q / max_k: the longest segments as host ints (`casa.batch.SeqLens`); None reads them
    from the boundaries (one host sync), except for a single segment, whose lengths are the
    totals (a one-sample decoding step: no sync)."""
    if max_q is None or max_k is None:
        if cu_q.numel() == 2:
            max_q, max_k = q.shape[0], k.shape[0]
        else:
            segs = _segments(cu_q, cu_k, q.shape[0], k.shape[0])  # one sync gives both max lengths
            max_q = max((q1 - q0 for q0, q1, _, _ in segs), default=0)
            max_k = max((k1 - k0 for _, _, k0, k1 in segs), default=0)
    # fp32 inputs go down to the autocast dtype; a half-precision mix is left for the kernel to refuse
    dtype = flash_dtype(q.dtype, q.device.type)
    q, k, v = (x if x.dtype in FLASH_DTYPES else x.to(dtype) for x in (q, k, v))
    return fn(q, _rows(k), _rows(v), cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
              dropout_p=0.0, softmax_scale=scale, causal=causal)


def _flash_decode(fn: Callable, q: torch.Tensor, kv: CachedKV, causal: bool, scale: float) -> torch.Tensor:
    """q [B * m, H, D] over a `CachedKV` -> [B * m, H, D]: one `fn` = `flash_attn_with_kvcache` call
    reads every sample's keys where the cache keeps them (no concatenation, no copy) and
    appends the new ones in place."""
    B, m = kv.k.shape[:2]
    if q.dim() != 3 or q.shape[0] != B * m:
        raise ValueError(f"expected q [B * m = {B * m}, H, D] for a cached decoding step of {B} samples x {m} "
                         f"new tokens, got {tuple(q.shape)}")
    # fp32 queries go down to the autocast dtype; the cache is stored in it already (`casa.cache`)
    q = q if q.dtype in FLASH_DTYPES else q.to(flash_dtype(q.dtype, q.device.type))
    out = fn(_rows(q).view(B, m, *q.shape[1:]), kv.k_cache, kv.v_cache, k=kv.k, v=kv.v,
             cache_seqlens=kv.cache_seqlens, softmax_scale=scale, causal=causal)  # [B, m, H, D]
    return out.reshape(q.shape)


class AttentionBackend:
    """One attention kernel, resolved and validated once when a layer is built (`make_backend`),
    then called for every attention of that layer:

        backend(q [Tq, H, D], k, v [Tk, Hkv, D] (or segmented, or `DecodeKV`), cu_seqlens_q,
                cu_seqlens_k [W+1], causal, *, scale, masked_key, return_probs, workspace,
                max_seqlen_q, max_seqlen_k) -> out [Tq, H, D]   (see `varlen_attention`)

    What can only be known per call (the device, whether gradients are needed: flex has no CPU
    backward, flash-attn needs CUDA) is checked per call by `why_not`, a few attribute reads."""

    name = ""
    masks_keys = False
    """Takes `masked_key` (paper Table 8): the explicit-softmax backends."""
    returns_probs = False
    """Can return the attention probabilities (`return_probs`, attention maps)."""
    segmented = False
    """Reads segmented keys in place; the whole-stream kernels take one concatenated tensor."""

    def why_not(self, device: torch.device, requires_grad: bool) -> str | None:
        """Why this backend cannot run on `device` (with gradients if `requires_grad`), or None."""
        return None

    def check(self, device: torch.device | str, requires_grad: bool) -> None:
        """Raise ValueError, naming the backends that can run here, if this one cannot."""
        device = torch.device(device)
        why = self.why_not(device, requires_grad)
        if why is None:
            return
        runnable = [b for b in BACKENDS if make_backend(b).why_not(device, requires_grad) is None]
        raise ValueError(f"backend={self.name!r} cannot run here ({why}); backends that can run here "
                         f"({device.type}, requires_grad={requires_grad}): {runnable}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __call__(self, q: torch.Tensor, k, v, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None,
                 causal: bool, *, scale: float | None = None, masked_key: torch.Tensor | None = None,
                 return_probs: bool = False, workspace: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 max_seqlen_q: int | None = None, max_seqlen_k: int | None = None):
        if isinstance(k, CachedKV):
            return self._cached(q, k, v, causal, scale)
        decode = isinstance(k, DecodeKV)
        if decode:
            if v is not k:
                raise ValueError(f"DecodeKV keys need v passed as the same DecodeKV, got v {type(v).__name__}")
            k, v = k.k, k.v
        if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
            raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                             f"must both be [W+1]")
        if not isinstance(k, torch.Tensor):
            _check_segmented(k, v, cu_seqlens_k.numel() - 1)
            if not self.segmented and len(k) == 1:
                # one sample's cache (decoding): its buffer view, read in place, no copy per token
                # (`casa.cache` keeps it token-major for these backends); dense and flex check its
                # length against cu_seqlens_k as they read the boundaries anyway
                k, v = k[0], v[0]
            elif not self.segmented:  # whole-stream kernels take one key tensor
                _check_lengths(k, (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist())
                k, v = torch.cat(list(k)), torch.cat(list(v))
        k0, v0 = (k, v) if isinstance(k, torch.Tensor) else (k[0], v[0])
        if q.dim() != 3 or k0.dim() != 3 or v0.shape[:2] != k0.shape[:2]:
            raise ValueError(f"expected q [Tq, H, D], k and v [Tk, Hkv, D]; got q {tuple(q.shape)}, "
                             f"k {tuple(k0.shape)}, v {tuple(v0.shape)}")
        if q.shape[1] % k0.shape[1] or q.shape[2] != k0.shape[2] or v0.shape[2] != k0.shape[2]:
            raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k0.shape[1]}) "
                             f"and head dims must match (q {q.shape[2]}, k {k0.shape[2]}, v {v0.shape[2]})")
        kv = [k, v] if isinstance(k, torch.Tensor) else [*k, *v]
        grad = torch.is_grad_enabled() and (q.requires_grad or any(x.requires_grad for x in kv))
        self.check(q.device, grad)
        if masked_key is not None:
            if not self.masks_keys:
                raise ValueError(f"masked_key needs backend 'dense' or 'eager', not backend={self.name!r}")
            if masked_key.shape != (q.shape[0],):
                raise ValueError(f"masked_key must be [Tq={q.shape[0]}], got {tuple(masked_key.shape)}")
        for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ValueError(f"{name}={n!r} must be a Python int >= 0 (a host value, not a tensor) or None")
        if return_probs and not self.returns_probs:
            raise ValueError(f"return_probs=True needs backend 'eager', not backend={self.name!r}")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return self._run(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale,
                         _Options(grad, decode, masked_key, return_probs, workspace, max_seqlen_q, max_seqlen_k))

    def _cached(self, q, kv: CachedKV, v, causal: bool, scale: float | None):
        raise ValueError(f"CachedKV keys need backend='flash' and v passed as the same CachedKV, got "
                         f"backend={self.name!r}, v {type(v).__name__}")

    def _run(self, q, k, v, cu_q, cu_k, causal: bool, scale: float, opt: "_Options"):
        """The kernel, on validated inputs (k, v tensors, or segmented if `segmented`)."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Options:
    """One call's options, validated by `AttentionBackend.__call__` (see `varlen_attention`)."""

    grad: bool  # gradients needed: q, k or v requires them and grad mode is on
    decode: bool  # keys came as `DecodeKV`: the cache's decoding path
    masked_key: torch.Tensor | None
    return_probs: bool
    workspace: Callable[[int, torch.Tensor], torch.Tensor] | None
    max_q: int | None
    max_k: int | None


class DenseBackend(AttentionBackend):
    name, masks_keys = "dense", True

    def _run(self, q, k, v, cu_q, cu_k, causal, scale, opt):
        return _dense(q, k, v, cu_q, cu_k, causal, scale, opt.masked_key)


class SdpaBackend(AttentionBackend):
    name, segmented = "sdpa", True

    def _run(self, q, k, v, cu_q, cu_k, causal, scale, opt):
        return _sdpa(q, k, v, cu_q, cu_k, causal, scale, opt.grad, opt.workspace, opt.decode)


class EagerBackend(AttentionBackend):
    name, masks_keys, returns_probs, segmented = "eager", True, True, True

    def _run(self, q, k, v, cu_q, cu_k, causal, scale, opt):
        return _eager(q, k, v, cu_q, cu_k, causal, scale, opt.masked_key, opt.return_probs)


class FlexBackend(AttentionBackend):
    name = "flex"

    def why_not(self, device: torch.device, requires_grad: bool) -> str | None:
        return "flex_attention has no backward on CPU" if device.type == "cpu" and requires_grad else None

    def _run(self, q, k, v, cu_q, cu_k, causal, scale, opt):
        return _flex(q, k, v, cu_q, cu_k, causal, scale)


class FlashBackend(AttentionBackend):
    """flash-attn, with its kernels injected: `varlen_fn` (signature and semantics of
    `flash_attn.flash_attn_varlen_func`) for every attention, `kvcache_fn`
    (`flash_attn.flash_attn_with_kvcache`) for the batched decoding step over a `CachedKV`.
    None: flash-attn's own, imported here once (left unset if the package is not installed,
    which `why_not` then reports). Injected kernels run on any device (CPU stand-ins:
    `tests.builders.flash_stand_in`); flash-attn's need CUDA."""

    name = "flash"

    def __init__(self, varlen_fn: Callable | None = None, kvcache_fn: Callable | None = None):
        self.injected = varlen_fn is not None
        if varlen_fn is None or kvcache_fn is None:
            real = _real_flash_kernels()
            varlen_fn = varlen_fn or (real[0] if real else None)
            kvcache_fn = kvcache_fn or (real[1] if real else None)
        self.varlen_fn, self.kvcache_fn = varlen_fn, kvcache_fn

    def __repr__(self) -> str:
        return f"FlashBackend(varlen_fn={getattr(self.varlen_fn, '__qualname__', self.varlen_fn)})"

    def why_not(self, device: torch.device, requires_grad: bool) -> str | None:
        if self.injected:
            return None
        if device.type != "cuda":
            return f"flash-attn needs a CUDA device, got {device.type!r}"
        if self.varlen_fn is None:
            return "flash-attn needs the flash-attn package, which is not installed"
        return None

    def _cached(self, q, kv: CachedKV, v, causal: bool, scale: float | None):
        if v is not kv:
            super()._cached(q, kv, v, causal, scale)
        self.check(q.device, False)
        return _flash_decode(self.kvcache_fn, q, kv, causal, q.shape[-1] ** -0.5 if scale is None else scale)

    def _run(self, q, k, v, cu_q, cu_k, causal, scale, opt):
        return _flash(self.varlen_fn, q, k, v, cu_q, cu_k, causal, scale, opt.max_q, opt.max_k)


def _real_flash_kernels() -> tuple[Callable, Callable] | None:
    """flash-attn's two kernels, or None when the package is not installed."""
    if not _flash_installed():
        return None
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # optional CUDA-only package

    return flash_attn_varlen_func, flash_attn_with_kvcache


_STATELESS = {"dense": DenseBackend(), "sdpa": SdpaBackend(), "eager": EagerBackend(), "flex": FlexBackend()}
EAGER = _STATELESS["eager"]
"""The backend that returns probabilities and hides keys: what capture and Table 8 masks switch to."""


def make_backend(name: "str | AttentionBackend") -> AttentionBackend:
    """A backend by name, resolved once (a layer keeps it); an `AttentionBackend` is returned as
    it is. `flash` takes the kernels of an enclosing `flash_kernels` block, else flash-attn's.
    Raises ValueError naming the valid names."""
    if isinstance(name, AttentionBackend):
        return name
    if name in _STATELESS:
        return _STATELESS[name]
    if name == "flash":
        return FlashBackend(*_FLASH_KERNELS) if _FLASH_KERNELS is not None else FlashBackend()
    raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)}")


def check_backend(name: "str | AttentionBackend", device: torch.device | str, requires_grad: bool) -> None:
    """Raise ValueError, naming the backends that can run here, if backend `name` cannot
    (tests and benchmarks; layers check their bound backend as they call it)."""
    make_backend(name).check(device, requires_grad)


def varlen_attention(q: torch.Tensor, k: Keys, v: Keys, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, causal: bool, backend: "str | AttentionBackend" = "sdpa", *,
                     scale: float | None = None, masked_key: torch.Tensor | None = None, return_probs: bool = False,
                     workspace: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None):
    """Attention of each query segment over its key segment (see the module docstring), through
    `backend`: a name (resolved per call by `make_backend`: tests, benchmarks) or the
    `AttentionBackend` a layer bound at build time.

    q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D], cu_seqlens_q / cu_seqlens_k [W+1] int32
        -> out [Tq, H, D]                                       (return_probs=False)
        -> (out [Tq, H, D], probs: list of W [H, Lq_w, Lk_w])    (return_probs=True, eager only)
    k, v may instead be segmented: W tensors [Lk_w, Hkv, D] (module docstring).
    scale: softmax scale, default D ** -0.5.
    masked_key [Tq] int64: one key (global index into k) hidden from each query, -1 = none
        (paper Table 8 "-self"/"-rnd"; dense and eager only). A query whose only visible key
        is hidden outputs zeros.
    workspace: `(numel, like) -> 1-D tensor` of numel elements with like's dtype and device,
        that the caller keeps between calls (`casa.cache.KVCache.workspace`); the `sdpa` decoding path
        computes its scores there. Contents are overwritten; results never alias it.
    max_seqlen_q, max_seqlen_k: the longest query / key segment as host ints, if the caller
        knows them (`casa.batch.SeqLens`): `flash` needs them and otherwise reads them from
        the boundaries, a host sync; the other backends ignore them.
    k = v = `DecodeKV`: the cache's decoding path (head-major buffers, `sdpa`'s `_decode_segment`).
    k = v = `CachedKV` (`flash` only): a decoding step over a several-sample cache; the
        cache's buffers are read and appended to in place, cu_seqlens_k may be None.
    """
    return make_backend(backend)(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale=scale, masked_key=masked_key,
                                 return_probs=return_probs, workspace=workspace, max_seqlen_q=max_seqlen_q,
                                 max_seqlen_k=max_seqlen_k)
