"""The keys and values of image tokens, fused: RMSNorm folded into the projection, RoPE in place.

Image tokens enter a CASA / CA layer only as keys and values:

    k = rope(W_k · norm(x)),   v = W_v · norm(x),   norm(x) = w ⊙ x / rms(x)

and they are most of a fused layer's tokens (10 x 1024 of the 10 x 1074 in the paper's
Table 11 setting). Through autograd, Hugging Face's RMSNorm (an fp32 upcast and four
elementwise ops) saves fp32 copies of x and of x / rms(x), the projection saves the
normalised tokens again, and RoPE is five more passes forward and backward: in that
setting this was more training memory than the keys and values themselves, and a third
of the layer's time (docs/benchmarks.md, `layer`).

Both factors of the norm commute with the matmul, so the normalised tokens are never
built. With r = 1 / rms(x) per row and W' = W ⊙ w (the norm's scale folded into the
weight's columns):

    forward    y  = r ⊙ (x @ W'ᵀ)                  one matmul on x itself; k = rope(y_k)
    backward   dy = [rope⁻¹(dk) | dv]              (RoPE is a rotation: its adjoint)
               M  = (r ⊙ dy)ᵀ @ x                  dW = M ⊙ w,  dw = Σ_rows(M ⊙ W)
               g̃  = (r ⊙ dy) @ W'                  dx = g̃ - r² · mean(g̃ ⊙ x) ⊙ x

(r is folded into the rotation tables where RoPE runs anyway: no separate scaling pass.)

Only x and r [N] are kept for the backward. Equal to the unfused composition up to
rounding: ~1e-6 in fp32, within bf16 rounding in bf16 (tests/test_image_kv.py).

    image_kv(attn, norm, x [N, d], cos [N, D], sin [N, D], family) -> k, v [N, Hkv, D]
"""

from __future__ import annotations

import torch
from torch import nn

from casa.family import ROPE_LAYOUTS, Family
from casa.rope import compute_dtype

__all__ = ["ROPE_LAYOUTS", "image_kv"]

def _rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, inverse: bool,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """k [N, H, D] rotated by cos/sin [N, D], or by the inverse rotation (the adjoint: RoPE
    is orthogonal). Each dimension pair (a, b) rotates as

        out_a = a c_a - b s_a,  out_b = b c_b + a s_b      (inverse: a c_a + b s_b, b c_b - a s_a)

    written as two passes per half instead of autograd's mul / neg / cat / mul / add. A
    per-row scale folded into cos/sin scales the result for free (`_ImageKV`: 1 / rms)."""
    h = k.shape[-1] // 2
    c, s = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)  # [N, 1, D]
    out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if out is None else out
    if layout == "half":
        pa, pb = slice(0, h), slice(h, None)  # k = [a | b]
        ca, cb, sa, sb = c[..., pa], c[..., pb], s[..., pa], s[..., pb]
    else:  # interleaved: k = [a0 b0 a1 b1 ...], both of a pair use cos/sin[i] of the first half
        pa, pb = slice(0, None, 2), slice(1, None, 2)
        ca = cb = c[..., :h]
        sa = sb = s[..., :h]
    a, b = k[..., pa], k[..., pb]
    if not inverse:
        torch.mul(a, ca, out=out[..., pa]).addcmul_(b, sa, value=-1)
        torch.mul(b, cb, out=out[..., pb]).addcmul_(a, sb)
    else:
        torch.mul(a, ca, out=out[..., pa]).addcmul_(b, sb)
        torch.mul(b, cb, out=out[..., pb]).addcmul_(a, sa, value=-1)
    return out


ROW_BLOCK = 1024
"""Rows per block of the backward's one row-wise reduction over [N, d] (`_ImageKV.backward`)."""


class _ImageKV(torch.autograd.Function):
    """(x, w, W_k, W_v, b_k, b_v, cos, sin, rope layout, eps, heads, head_dim) -> k, v [N, Hkv, D];
    cos = None: no RoPE (it is applied outside, e.g. after Qwen3's k_norm)."""

    @staticmethod
    def forward(ctx, x, norm_weight, wk, wv, bk, bv, cos, sin, layout, eps, heads, head_dim):
        N, h, O_k = x.shape[0], head_dim // 2, wk.shape[0]
        w_k = wk  # the parameter itself is what the backward keeps, not a permuted copy
        perm = None
        if layout == "interleaved":
            # Helium pairs dimensions (2i, 2i+1): rotating them in place is eight strided
            # passes. Permuting W_k's rows makes the projection emit each head as [evens | odds]
            # instead, rotated with contiguous halves and interleaved back in one copy.
            perm = torch.arange(heads * head_dim, device=x.device).view(heads, h, 2).transpose(1, 2).reshape(-1)
            wk = wk[perm]
            bk = None if bk is None else bk[perm]
            cos, sin = cos[:, :h].repeat(1, 2), sin[:, :h].repeat(1, 2)  # pair i uses cos[i] for both
        rot = "half" if perm is not None else layout  # the layout the keys are rotated in here
        r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square_() / x.shape[-1] + eps)  # [N]
        rc = r.to(x.dtype)[:, None]  # [N, 1]
        w_folded = torch.cat([wk, wv]) * norm_weight.to(wk.dtype)  # [2 Hkv D, d] = W' = W ⊙ w
        y = x @ w_folded.t()  # [N, 2 Hkv D], still to be scaled by r
        k_raw, v = y[:, :O_k].view(N, heads, head_dim), y[:, O_k:].view(N, heads, head_dim)  # [N, Hkv, D]
        if cos is not None and bk is None:
            # r is folded into the rotation tables: k = rope(r ⊙ y_k) in one rotation pass
            k = _rope(k_raw, cos * r[:, None], sin * r[:, None], rot, False)
            v = v * rc[:, :, None]  # a tensor of its own: y is freed once both are out
        else:
            y.mul_(rc)
            if bk is not None:
                y += torch.cat([bk, bv])
            k = k_raw if cos is None else _rope(k_raw, cos, sin, rot, False)
        if perm is not None:  # [evens | odds] -> interleaved
            k = k.view(N, heads, 2, h).transpose(-1, -2).reshape(N, heads, head_dim)
        ctx.save_for_backward(x, r, norm_weight, w_k, wv, cos, sin, perm)
        ctx.has_bias = bk is not None
        ctx.layout = rot
        return k, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dk, dv):
        x, r, norm_weight, wk, wv, cos, sin, perm = ctx.saved_tensors
        need_x, need_nw, need_wk, need_wv, need_bk, need_bv = ctx.needs_input_grad[:6]
        N, O_k, O_v = x.shape[0], wk.shape[0], wv.shape[0]
        dtype = x.dtype
        rc = r.to(dtype)[:, None]  # [N, 1]
        # dyr = r ⊙ dy, the cotangent of the unscaled projection x @ W'ᵀ: both matmuls below
        # take it, so r is applied once, folded into the inverse rotation for the keys
        dyr = torch.empty(N, O_k + O_v, dtype=dtype, device=x.device)  # [N, 2 Hkv D]
        if dk is None:
            dyr[:, :O_k] = 0
        elif cos is not None:
            D = cos.shape[-1]
            Hkv = O_k // D  # explicit, not -1: a text-only batch has N = 0 image tokens
            dk = dk.reshape(N, Hkv, D)
            if perm is not None:  # interleaved -> [evens | odds], the layout the forward rotated in
                dk = dk.view(N, Hkv, D // 2, 2).transpose(-1, -2).reshape(N, Hkv, D)
            _rope(dk, cos * r[:, None], sin * r[:, None], ctx.layout, inverse=True,
                  out=dyr[:, :O_k].view(N, Hkv, D))
        else:
            torch.mul(dk.reshape(N, O_k), rc, out=dyr[:, :O_k])
        if dv is None:
            dyr[:, O_k:] = 0
        else:
            torch.mul(dv.reshape(N, O_v), rc, out=dyr[:, O_k:])
        del dk, dv
        dx = dnw = dwk = dwv = dbk = dbv = None
        # [W_k; W_v] is built once, after the transposed copy of dyr below, and freed (with dyr)
        # before the g ⊙ x temporary: alive across either, it sat on the backward's memory peak
        w_cat = None  # [2 Hkv D, d], W_k's rows in the order the forward projected them

        def weights():
            return torch.cat([wk if perm is None else wk[perm], wv])

        if need_wk or need_wv or need_nw:
            # a transposed copy first: mkldnn's matmul with a transposed [N, O] operand was 1.6x slower
            m = dyr.t().contiguous() @ x  # [2 Hkv D, d] = Σ_i r_i dy_i x_iᵀ
            if need_wk or need_wv:
                dw = m * norm_weight.to(m.dtype)
                dwk, dwv = dw[:O_k], dw[O_k:]
            if need_nw:
                w_cat = weights()
                dnw = (m.float() * w_cat.float()).sum(0).to(norm_weight.dtype)
            del m
        if ctx.has_bias and (need_bk or need_bv):
            db = (dyr.float() / r[:, None]).sum(0).to(dtype)  # Σ dy: the bias is added after the scaling
            dbk, dbv = db[:O_k], db[O_k:]
        if need_x:
            # with g = dy @ W': dx = r g - r³ mean(g ⊙ x) x = g̃ - r² mean(g̃ ⊙ x) x, g̃ = dyr @ W'
            w_cat = weights() if w_cat is None else w_cat
            g = dyr @ w_cat.mul_(norm_weight.to(wk.dtype))  # [N, d] = g̃ (W' folded in place)
            del w_cat, dyr  # freed before the g ⊙ x reduction below, where the backward peaked
            s = torch.empty(N, dtype=torch.float32, device=x.device)  # [N] mean(g̃ ⊙ x)
            B = ROW_BLOCK  # in row blocks: g ⊙ x whole would be another [N, d] on the peak
            for i in range(0, N, B):
                torch.sum(g[i:i + B] * x[i:i + B], dim=-1, dtype=torch.float32, out=s[i:i + B])
            s /= x.shape[-1]
            dx = g.addcmul_(x, (r.square() * s).to(dtype)[:, None], value=-1)  # in g's storage
        if perm is not None:  # gradients of the permuted rows back to W_k's own order
            inv = torch.argsort(perm)
            dwk = None if dwk is None else dwk[inv]
            dbk = None if dbk is None else dbk[inv]
        return dx, dnw, dwk, dwv, dbk, dbv, None, None, None, None, None, None


def image_kv(attn: nn.Module, norm: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             family: Family) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of image tokens x [N, d] through an HF attention module's k/v
    projections, after `norm` and with RoPE (`family.rope_fn`, tables cos/sin [N, D]) on the
    keys -> k, v [N, Hkv, D]. As the family table says (`casa.family.Family`, bound at build
    time): the norm is folded when it is an RMSNorm (`norm == "rms"`), RoPE applied in place
    when its layout is one of `ROPE_LAYOUTS` and no k_norm comes between; the plain
    composition otherwise (same values)."""
    N, D = x.shape[0], attn.head_dim
    Hkv = attn.k_proj.out_features // D
    dtype = compute_dtype(x.dtype, x.device)  # what k_proj(x) would give: autocast's dtype under autocast
    if N == 0 and not torch.is_grad_enabled():
        # a decoding step has no image: folding the norm into [W_k; W_v] would cost more than
        # the step's own projections (training keeps the graph, and the weights' zero grads)
        return x.new_empty(0, Hkv, D, dtype=dtype), x.new_empty(0, Hkv, D, dtype=dtype)
    k_norm = attn.k_norm if family.qk_norm else None  # Qwen3: per-head RMSNorm on keys, before RoPE
    layout = family.rope_layout if k_norm is None else None
    if family.norm == "rms":
        fold = layout is not None  # RoPE inside the function, else after it (and after k_norm)
        # autocast does not reach inside an autograd.Function's backward: the casts it would
        # make are made here, so forward and backward both run in `dtype` (bf16 under
        # bf16-mixed, as autocast runs the projections) and k, v come out in one dtype
        cast = (lambda t: t) if dtype == x.dtype else (lambda t: None if t is None else t.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            k, v = _ImageKV.apply(cast(x), norm.weight, cast(attn.k_proj.weight), cast(attn.v_proj.weight),
                                  cast(attn.k_proj.bias), cast(attn.v_proj.bias), cos if fold else None,
                                  sin if fold else None, layout, float(norm.variance_epsilon), Hkv, D)
        if fold:
            return k, v
    else:  # a norm the fold does not know: plain autograd
        n = norm(x)
        k, v = attn.k_proj(n).view(N, Hkv, D), attn.v_proj(n).view(N, Hkv, D)
    if k_norm is not None:
        k = k_norm(k)  # HF norms return their weight's dtype: fp32 under autocast
    return family.rope_fn(k, k, cos, sin, unsqueeze_dim=1)[0].to(v.dtype), v
