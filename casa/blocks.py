"""The decoder block casa runs in place of each Hugging Face decoder layer.

A `DecoderBlock` keeps the layer's children under their Hugging Face names (so pretrained
keys load unchanged) and runs one pre-norm residual block over a packed stream:

    x <- attention(x, images)              the block's `attention` step, one of:
           SelfAttention  (unfused):      x + SA(n(x))
           Parallel       (CA, CASA⊕):    x + SA(n(x)) + F(n(x), images)
           Before         (CA, CASA→):    x' = x + F(n_F(x), images);  x' + SA(n(x'))
           Replace        (CASA∨):        x + W(n(x), images)      (the SA weights, windowed)
    x <- x + FFN(n2(x))

where F is the block's fusion layer (`fusion_attn`, e.g. `casa.fusion.layers.WindowAttention`),
n_F its own pre-norm (`fusion_attn.norm`), W a windowed attention run with the block's own SA
weights, and n, n2 are `input_layernorm`, `post_attention_layernorm`. A strategy composes a
block once, when it attaches (`DecoderBlock.fuse`): it builds the step and the fusion layer;
`forward` has no branch on the strategy. A new way to fuse is a new `AttentionStep`.

The steps hold no parameters: the fusion layer is the block's child `fusion_attn` (its keys,
`layers.{i}.fusion_attn.*`, are the checkpoints'), which the step reads from the block.

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


class FusionLayer(Protocol):
    """What `Parallel` and `Before` add to a block (`casa.fusion.layers.WindowAttention`):
    h [T, d] normalised text, images [N, d] raw image tokens and the norm they take -> [T, d].
    `Before` also reads its own pre-norm, `norm`."""

    def __call__(self, h: torch.Tensor, images: torch.Tensor, image_norm: nn.Module, ctx: StreamContext,
                 layer_idx: int) -> torch.Tensor: ...


class WindowedSelfAttention(Protocol):
    """What a `Replace` step runs in place of SA, with the block's own SA weights:
    `casa.fusion.layers.window_attention` with its kind bound, handed over by the strategy
    when it attaches, so that the block never imports the fusion package.

    attn: the block's SA module; h [T, d] normalised text; images [N, d] raw image tokens and
    the norm they take -> [T, d] (after `o_proj`)."""

    def __call__(self, attn: nn.Module, family: Family, h: torch.Tensor, images: torch.Tensor,
                 image_norm: nn.Module, ctx: StreamContext, layer_idx: int,
                 backend: AttentionBackend) -> torch.Tensor: ...


class AttentionStep(nn.Module):
    """The attention half of a block: (block, x [L, d], images [N, d], ctx) -> x [L, d],
    residual included. No parameters of its own (the block's children hold them).

    `form` names it ("none", "parallel", "before", "replace": what `casa.flops` counts);
    `uses_fusion_layer`: whether the block must hold a `fusion_attn` for it."""

    form = "none"
    uses_fusion_layer = False

    def forward(self, block: "DecoderBlock", x: torch.Tensor, images: torch.Tensor,
                ctx: StreamContext) -> torch.Tensor:
        return x + block.self_attention(block.input_layernorm(x), ctx)


SelfAttention = AttentionStep
"""The unfused step: x + SA(n(x))."""


class Parallel(AttentionStep):
    """x + SA(n(x)) + F(n(x), images): the fusion layer reads the SA's normalised input,
    and image tokens take the block's input norm."""

    form = "parallel"
    uses_fusion_layer = True

    def forward(self, block, x, images, ctx):
        h = block.input_layernorm(x)
        a = block.self_attention(h, ctx)
        return x + (a + block.fusion_attn(h, images, block.input_layernorm, ctx, block.layer_idx))


class Before(AttentionStep):
    """x' = x + F(n_F(x), images), then x' + SA(n(x')): the fusion layer runs first, with its
    own pre-norm n_F (`fusion_attn.norm`, copied from the block's input norm), which the image
    tokens take too."""

    form = "before"
    uses_fusion_layer = True

    def forward(self, block, x, images, ctx):
        norm = block.fusion_attn.norm
        x = x + block.fusion_attn(norm(x), images, norm, ctx, block.layer_idx)
        return super().forward(block, x, images, ctx)


class Replace(AttentionStep):
    """x + W(n(x), images): the block's SA weights attend over windows (CASA∨, no new
    parameters). windowed_attention: see `WindowedSelfAttention`."""

    form = "replace"

    def __init__(self, windowed_attention: WindowedSelfAttention):
        super().__init__()
        self.windowed_attention = windowed_attention

    def forward(self, block, x, images, ctx):
        h = block.input_layernorm(x)
        return x + self.windowed_attention(block.self_attn, block.family, h, images, block.input_layernorm, ctx,
                                           block.layer_idx, backend=block.window_backend or block.kernel)

    def extra_repr(self) -> str:
        return getattr(self.windowed_attention, "__name__", None) or repr(self.windowed_attention)


class DecoderBlock(nn.Module):
    def __init__(self, layer: nn.Module, layer_idx: int, family: Family, attn_backend: str = "sdpa"):
        super().__init__()
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.layer_idx = layer_idx
        self.family = family  # RoPE, norm kind, q/k norm (`casa.backbone.family_table`)
        self.attn_backend = attn_backend  # resolved and validated once (`kernel`)
        self.window_backend: AttentionBackend | None = None  # a model mode's override of a `Replace` step
        self.attention: AttentionStep = SelfAttention()
        self.fusion_attn: nn.Module | None = None
        self.image_ffn_updates = False

    def fuse(self, attention: AttentionStep, fusion_attn: nn.Module | None = None,
             image_ffn_updates: bool = False) -> None:
        """Compose this block (build time only): `attention` becomes its attention step,
        `fusion_attn` (a new module, so new keys `fusion_attn.*`) the fusion layer it reads;
        image_ffn_updates: image tokens go through this block's FFN (paper Table 5)."""
        if not isinstance(attention, AttentionStep):
            raise TypeError(f"DecoderBlock.fuse: attention={attention!r} is not an AttentionStep")
        if (fusion_attn is None) == attention.uses_fusion_layer:
            raise ValueError(f"DecoderBlock.fuse: a {type(attention).__name__} step "
                             f"{'needs' if fusion_attn is None else 'takes no'} fusion layer")
        self.attention = attention
        self.fusion_attn = fusion_attn
        self.image_ffn_updates = image_ffn_updates and self.fused

    @property
    def attn_backend(self) -> str:
        """The name of the bound attention backend (`kernel`); setting it (build time) rebinds."""
        return self.kernel.name

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self.kernel = make_backend(name)

    @property
    def fused(self) -> bool:
        """Whether a strategy composed this block (it then reads the image tokens)."""
        return type(self.attention) is not SelfAttention

    # ------------------------------------------------------------------ attention
    def self_attention(self, h: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        """Block-diagonal causal SA over the samples of the stream: h [L, d] -> [L, d]."""
        attn = self.self_attn
        q, k, v = project_qkv(attn, h, self.family.qk_norm)
        q, k = self.family.rope_fn(q, k, ctx.cos, ctx.sin, unsqueeze_dim=1)
        cu_q = cu_k = ctx.cu_seqlens
        if ctx.cache is not None:
            k, v, cu_k = ctx.cache.self_attention(self.layer_idx, k, v, ctx.cu_seqlens, self.kernel)
        max_len = ctx.max_seqlen if ctx.cache is None else None  # cached keys: the cache's lengths
        o = self.kernel(q, k, v, cu_q, cu_k, causal=True, scale=attn.scaling,
                        workspace=None if ctx.cache is None else ctx.cache.workspace,
                        max_seqlen_q=max_len, max_seqlen_k=max_len)
        return attn.o_proj(o.reshape(h.shape[0], -1))  # [L, H*D] -> [L, d]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, images: torch.Tensor,
                ctx: StreamContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [L, d] stream, images [N, d] image tokens (empty for insertion) -> (x [L, d], the
        updated images [N, d] if this block updates them (`image_ffn_updates`), else None).

        Unchanged images come back as None, not as the input tensor: FSDP2 hooks every tensor
        a wrapped block returns, and its inputs arrive as views, so returning the input would
        hook the same view again at every block (and FSDP2 warns that an in-place op on it
        would skip the all-gather)."""
        x = self.attention(self, x, images, ctx)
        x = x + self.mlp(self.post_attention_layernorm(x))
        if self.image_ffn_updates and images.shape[0] > 0:
            # paper Table 5: image tokens updated by the block's FFN (costly; off by default)
            return x, images + self.mlp(self.post_attention_layernorm(images))
        return x, None
