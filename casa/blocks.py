"""The decoder block casa runs in place of each Hugging Face decoder layer.

A `DecoderBlock` keeps the layer's children under their Hugging Face names (so pretrained
keys load unchanged) and runs one pre-norm residual block over a packed stream:

    parallel (CA / CASA⊕):  x <- x + SA(n(x)) + F(n(x), images)
    before   (CA / CASA→):  x <- x + F(n_f(x), images);  x <- x + SA(n(x))
    replace  (CASA∨):       x <- x + CASA(n(x), images)      (the SA weights, windowed)
    none     (insertion):   x <- x + SA(n(x))
    then always             x <- x + FFN(n2(x))

where F is the block's fusion layer (`casa.fusion.layers.WindowAttention`) and n, n2 are
`input_layernorm`, `post_attention_layernorm`. Which form a block takes is decided once,
when a `FusionStrategy` attaches itself (`set_fusion`), never per call.

Image tokens are keys/values only: they are normalised with the norm that feeds the
fusion attention (folded into their K/V projection, `casa.image_kv`) and, unless the
strategy asks for FFN updates (paper Table 5), they are never changed by a block.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from casa.attention import AttentionBackend, make_backend
from casa.context import StreamContext
from casa.family import Family

FUSION_MODES = ("none", "parallel", "before", "replace")


def project_qkv(attn: nn.Module, x: torch.Tensor, qk_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[L, d] through an HF attention module's projections -> q [L, H, D], k, v [L, Hkv, D];
    qk_norm (`Family.qk_norm`, Qwen3): then its per-head `q_norm` / `k_norm`."""
    L, D = x.shape[0], attn.head_dim
    H, Hkv = attn.q_proj.out_features // D, attn.k_proj.out_features // D  # explicit: L may be 0
    q = attn.q_proj(x).view(L, H, D)  # [L, H, D]
    k = attn.k_proj(x).view(L, Hkv, D)  # [L, Hkv, D]
    v = attn.v_proj(x).view(L, Hkv, D)  # [L, Hkv, D]
    if qk_norm:  # Qwen3: per-head RMSNorm on queries and keys, before RoPE
        # HF norms return their weight's dtype: fp32 under autocast, where v is bf16
        q, k = attn.q_norm(q).to(v.dtype), attn.k_norm(k).to(v.dtype)
    return q, k, v


class WindowedSelfAttention(Protocol):
    """What a CASA∨ block runs in place of its SA, with the block's own SA weights:
    `casa.fusion.layers.window_attention` with its kind bound, handed to the block by the
    strategy when it attaches (`set_fusion`), so that the block never imports the fusion package.

    attn: the block's SA module; h [T, d] normalised text; images [N, d] raw image tokens and
    the norm they take -> [T, d] (after `o_proj`)."""

    def __call__(self, attn: nn.Module, family: Family, h: torch.Tensor, images: torch.Tensor,
                 image_norm: nn.Module, ctx: StreamContext, layer_idx: int,
                 backend: AttentionBackend) -> torch.Tensor: ...


class DecoderBlock(nn.Module):
    def __init__(self, layer: nn.Module, layer_idx: int, family: Family, attn_backend: str = "sdpa"):
        super().__init__()
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.layer_idx = layer_idx
        self.family = family  # RoPE, norm kind, q/k norm (`casa.backbone.family_table`)
        self.attn_backend = attn_backend  # resolved and validated once (`attention`)
        self.window_backend: AttentionBackend | None = None  # a model mode's override of mode "replace"
        self.fusion_mode = "none"
        self.fusion_attn: nn.Module | None = None
        self.windowed_attention: WindowedSelfAttention | None = None
        self.image_ffn_updates = False

    @property
    def attn_backend(self) -> str:
        """The name of the bound attention backend (`attention`); setting it (build time) rebinds."""
        return self.attention.name

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self.attention = make_backend(name)

    def set_fusion(self, mode: str, fusion_attn: nn.Module | None, image_ffn_updates: bool = False,
                   windowed_attention: WindowedSelfAttention | None = None) -> None:
        """Turn this block into a fused block (build time only).

        fusion_attn: the fusion layer of modes "parallel" and "before" (a new module, so new keys);
        windowed_attention: what mode "replace" runs in place of SA (a function, no parameters)."""
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {mode!r} is not one of {list(FUSION_MODES)}")
        if (fusion_attn is None) != (mode in ("none", "replace")):
            raise ValueError(f"fusion mode {mode!r} {'needs' if fusion_attn is None else 'takes no'} fusion layer")
        if (windowed_attention is not None) != (mode == "replace"):
            raise ValueError(f"fusion mode {mode!r} {'needs' if windowed_attention is None else 'takes no'} "
                             "windowed_attention")
        self.fusion_mode = mode
        self.fusion_attn = fusion_attn
        self.windowed_attention = windowed_attention
        self.image_ffn_updates = image_ffn_updates and mode != "none"

    # ------------------------------------------------------------------ attention
    def self_attention(self, h: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        """Block-diagonal causal SA over the samples of the stream: h [L, d] -> [L, d]."""
        attn = self.self_attn
        q, k, v = project_qkv(attn, h, self.family.qk_norm)
        q, k = self.family.rope_fn(q, k, ctx.cos, ctx.sin, unsqueeze_dim=1)
        cu_q = cu_k = ctx.cu_seqlens
        if ctx.cache is not None:
            k, v, cu_k = ctx.cache.self_attention(self.layer_idx, k, v, ctx.cu_seqlens, self.attention)
        max_len = ctx.max_seqlen if ctx.cache is None else None  # cached keys: the cache's lengths
        o = self.attention(q, k, v, cu_q, cu_k, causal=True, scale=attn.scaling,
                           workspace=None if ctx.cache is None else ctx.cache.workspace,
                           max_seqlen_q=max_len, max_seqlen_k=max_len)
        return attn.o_proj(o.reshape(h.shape[0], -1))  # [L, H*D] -> [L, d]

    def _windowed_self_attention(self, h: torch.Tensor, images: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        return self.windowed_attention(self.self_attn, self.family, h, images, self.input_layernorm, ctx,
                                       self.layer_idx, backend=self.window_backend or self.attention)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, images: torch.Tensor,
                ctx: StreamContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [L, d] stream, images [N, d] image tokens (empty for insertion) -> (x [L, d], the
        updated images [N, d] if this block updates them (`image_ffn_updates`), else None).

        Unchanged images come back as None, not as the input tensor: FSDP2 hooks every tensor
        a wrapped block returns, and its inputs arrive as views, so returning the input would
        hook the same view again at every block (and FSDP2 warns that an in-place op on it
        would skip the all-gather)."""
        mode = self.fusion_mode
        if mode == "before":
            norm = self.fusion_attn.norm  # the fusion layer's own pre-norm, copied from input_layernorm
            x = x + self.fusion_attn(norm(x), images, norm, ctx, self.layer_idx)
        h = self.input_layernorm(x)
        if mode == "replace":
            a = self._windowed_self_attention(h, images, ctx)
        else:
            a = self.self_attention(h, ctx)
        if mode == "parallel":
            a = a + self.fusion_attn(h, images, self.input_layernorm, ctx, self.layer_idx)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        if self.image_ffn_updates and images.shape[0] > 0:
            # paper Table 5: image tokens updated by the block's FFN (costly; off by default)
            return x, images + self.mlp(self.post_attention_layernorm(images))
        return x, None
