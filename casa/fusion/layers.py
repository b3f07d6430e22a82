"""Windowed attention from text to image tokens: the layer CA and CASA share.

`window_attention` is the computation (also used by CASA∨, which runs it with a block's own
SA weights); `WindowAttention` is the extra layer CA, gated CA, CASA⊕ and CASA→ add to a
block, initialised as a copy of that block's SA (paper §3: "initialised from the SA
weights"), so the new layer starts by attending like the pretrained model does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from casa.attention import AttentionBackend, make_backend, varlen_attention
from casa.blocks import project_qkv
from casa.context import StreamContext
from casa.family import Family
from casa.fusion.windows import window_keys
from casa.image_kv import image_kv


def window_attention(attn: nn.Module, family: Family, h: torch.Tensor, images: torch.Tensor, image_norm: nn.Module,
                     ctx: StreamContext, layer_idx: int, backend: AttentionBackend, kind: str) -> torch.Tensor:
    """Text queries attend to the image tokens of their window (+ the window's text for CASA).

    attn: an HF attention module (its projections are used); family: the backbone's
    conventions (`casa.family.Family`); h [T, d] normalised text; images [N, d] image tokens,
    normalised here by `image_norm` (inside the fused K/V projection, `casa.image_kv`)
    -> [T, d] (after `o_proj`).

    backend: the layer's bound backend. Capture (`ctx.capture`) and the Table 8 masks
    (`index.masked_key`) need the eager one, which the model binds when it enters those modes
    (`VisionLanguageModel.set_capture` / `set_inference_mask`); another backend refuses them.
    """
    index = ctx.windows
    if index is None or index.kind != kind:
        raise RuntimeError(f"a {kind} layer ran without a {kind} window index (the strategy did not prepare the batch)")
    T = h.shape[0]
    q, k_txt, v_txt = project_qkv(attn, h, family.qk_norm)
    q, k_txt = family.rope_fn(q, k_txt, ctx.cos, ctx.sin, unsqueeze_dim=1)
    k_img, v_img = image_kv(attn, image_norm, images, index.image_cos, index.image_sin, family)  # [N, Hkv, D]
    cu_k = index.cu_k
    if ctx.cache is not None:
        k, v, cu_k = ctx.cache.window(layer_idx, kind, k_img, v_img, k_txt, v_txt, index, backend)
    else:  # CASA: [K, Hkv, D] in [image_w | text_w] layout; CA: the images each window sees
        k, v = window_keys(k_img, k_txt, index), window_keys(v_img, v_txt, index)
    masked = index.masked_key
    if ctx.capture is not None:
        o, probs = varlen_attention(q, k, v, index.cu_q, cu_k, causal=index.causal, backend=backend,
                                    scale=attn.scaling, masked_key=masked, return_probs=True)
        ctx.capture.append({"layer": layer_idx, "kind": kind, "probs": [p.detach() for p in probs],
                            "window_cu_text": index.cu_q.tolist(), "window_cu_image": index.window_cu_image.tolist()})
    else:
        cached = ctx.cache is not None  # cached keys: the cache's lengths, not the batch's
        o = varlen_attention(q, k, v, index.cu_q, cu_k, causal=index.causal, backend=backend, scale=attn.scaling,
                             masked_key=masked, max_seqlen_q=None if cached else index.max_q,
                             max_seqlen_k=None if cached else index.max_k)
    return attn.o_proj(o.reshape(T, -1))  # [T, H*D] -> [T, d]


class WindowAttention(nn.Module):
    """The fusion layer added to a block by CA / gated CA / CASA⊕ / CASA→.

    Args:
        self_attn: the block's SA module, copied (weights included) as this layer's attention.
        family: the backbone family's conventions (`casa.family.Family`, the block's).
        kind: "casa" or "cross_attention".
        backend: attention backend (name), bound once (`attention`).
        gated: multiply the output by tanh(gate), gate initialised at 0 (Flamingo-style gated
            CA: the model equals its backbone at init).
        norm: for placement "before", the block's input norm, copied as this layer's pre-norm.
    """

    def __init__(self, self_attn: nn.Module, family: Family, kind: str, backend: str, gated: bool = False,
                 norm: nn.Module | None = None):
        super().__init__()
        self.attn = copy.deepcopy(self_attn)
        for p in self.attn.parameters():
            p.requires_grad_(True)  # a new layer trains even when the backbone is frozen
        self.norm = copy.deepcopy(norm) if norm is not None else None
        if self.norm is not None:
            for p in self.norm.parameters():
                p.requires_grad_(True)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.family = family
        self.kind = kind
        self.backend = backend
        self.window_backend: AttentionBackend | None = None  # a model mode's override (capture, masks)

    @property
    def backend(self) -> str:
        """The name of the bound attention backend (`kernel`); setting it (build time) rebinds."""
        return self.kernel.name

    @backend.setter
    def backend(self, name: str) -> None:
        self.kernel = make_backend(name)

    def forward(self, h: torch.Tensor, images: torch.Tensor, image_norm: nn.Module, ctx: StreamContext,
                layer_idx: int) -> torch.Tensor:
        """h [T, d] normalised text, images [N, d] raw image tokens and the norm they take
        (the block's, or this layer's own for placement "before") -> [T, d]."""
        out = window_attention(self.attn, self.family, h, images, image_norm, ctx, layer_idx,
                               self.window_backend or self.kernel, self.kind)
        if self.gate is not None:
            out = out * torch.tanh(self.gate)
        return out
