"""Perceiver resampler + gated cross-attention (Flamingo, Alayrac et al. 2022, §2.1 and Fig. 4).

Each image is compressed to Q tokens by a Perceiver resampler: Q learned latents [Q, d]
attend to [image tokens; latents] of their image, then an FFN, `depth` times (pre-norm,
residual), then a final norm. The decoder's text then cross-attends to the compressed
tokens of its window through gated cross-attention layers (`GatedCrossAttention`: tanh
gates at 0, so the model is exactly its backbone at initialisation), one every `every`
blocks, placed before the block's SA by default as in Flamingo:

    image i [n_i, d] ──Perceiver──> [Q, d]    (latents attend to cat(image_i, latents))
    window w text  ──gated CA──>  the compressed tokens of window w's images

Compressed tokens have no spatial grid: they take a 1-D run of positions ending just before
their window's first text token (`casa.positions.window_image_positions`). With the KV cache
they are cached like CA's image keys (`casa.cache.KVCache.window`). Flamingo's learned time
embeddings of video frames are not modelled (a frame here is an image of its own).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from casa.attention import make_backend
from casa.fusion.cross_attention import GatedCrossAttention


class PerceiverLayer(nn.Module):
    """latents <- latents + Attn(q = n_l(latents), kv = [n_m(image); n_l(latents)]);
    latents <- latents + FFN(latents). Latents [I*Q, d], image tokens [N, d]."""

    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.heads = heads
        self.kernel = make_backend(backend)  # resolved and validated once, at build time
        self.norm_media, self.norm_latents, self.norm_ffn = (nn.LayerNorm(dim) for _ in range(3))
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, latents: torch.Tensor, media: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                cu_q: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
        """rows: where each image token and each latent goes in the per-image [image_i | latents_i]
        key layout (`Perceiver.forward`); cu_q [I+1], cu_k [I+1] its segments."""
        L, d = latents.shape
        H = self.heads
        h = self.norm_latents(latents)
        kv_in = h.new_empty(media.shape[0] + L, d).index_copy(0, rows[0], self.norm_media(media)).index_copy(0, rows[1], h)
        q = self.to_q(h).view(L, H, d // H)  # [I*Q, H, D]
        k, v = self.to_kv(kv_in).view(-1, 2, H, d // H).unbind(1)  # 2 x [N + I*Q, H, D]
        o = self.kernel(q, k, v, cu_q, cu_k, causal=False)
        latents = latents + self.to_out(o.reshape(L, d))
        return latents + self.ffn(self.norm_ffn(latents))


class Perceiver(nn.Module):
    """The resampler: image tokens [N, d] of I images (counts [I]) -> [I*Q, d]."""

    def __init__(self, dim: int, num_latents: int, depth: int, heads: int, backend: str):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        I, Q = counts.shape[0], self.latents.shape[0]
        dev = media.device
        counts = counts.to(dev).long()
        before = counts.cumsum(0) - counts  # [I] image tokens of earlier images
        n = torch.arange(media.shape[0], device=dev)
        image_of = torch.repeat_interleave(torch.arange(I, device=dev), counts)  # [N]
        # key layout per image: [image_i | latents_i]; image token n of image i lands after the
        # latents of earlier images, latent j of image i after image i's own tokens
        media_rows = n + image_of * Q
        latent_rows = (before + counts + torch.arange(I, device=dev) * Q).repeat_interleave(Q) + torch.arange(Q, device=dev).repeat(I)
        cu_q = (torch.arange(I + 1, device=dev) * Q).to(torch.int32)
        cu_k = F.pad((counts + Q).cumsum(0), (1, 0)).to(torch.int32)
        x = self.latents.to(media.dtype).repeat(I, 1)  # [I*Q, d]
        for layer in self.layers:
            x = layer(x, media, (media_rows, latent_rows), cu_q, cu_k)
        return self.norm(x)


class PerceiverCrossAttention(GatedCrossAttention):
    """Args:
        num_latents: Q compressed tokens per image (Flamingo: 64).
        depth: resampler layers (Flamingo: 6).
        heads: resampler attention heads (the LM width must be divisible by it).
        placement: where the gated CA sits in a block: "before" its SA (Flamingo) or "parallel".
        every: a gated CA layer in blocks 0, every, 2*every, ... (Flamingo: every 4th for 80B).
        image_ffn_updates: compressed tokens go through each fused block's FFN (paper Table 5).
        backend: attention backend of the CA layers (default: the backbone's).
        resampler_backend: attention backend inside the resampler.
    """

    name = "perceiver_cross_attention"

    def __init__(self, num_latents: int = 64, depth: int = 2, heads: int = 4,
                 placement: Literal["parallel", "before"] = "before", every: int = 1, image_ffn_updates: bool = False,
                 backend: Literal["dense", "sdpa", "eager", "flex", "flash"] | None = None,
                 resampler_backend: Literal["dense", "sdpa", "eager", "flex", "flash"] = "sdpa"):
        super().__init__(placement=placement, every=every, image_ffn_updates=image_ffn_updates, backend=backend)
        if num_latents < 1:
            raise ValueError(f"PerceiverCrossAttention.num_latents={num_latents!r} must be >= 1 (Flamingo: 64)")
        if depth < 1:
            raise ValueError(f"PerceiverCrossAttention.depth={depth!r} must be >= 1 (Flamingo: 6)")
        self.num_latents, self.depth, self.heads, self.resampler_backend = num_latents, depth, heads, resampler_backend
        self.compressed_tokens = num_latents
        self.resampler: Perceiver | None = None

    def attach(self, backbone: nn.Module, merge: int) -> None:
        d = backbone.hidden_size
        if d % self.heads:
            raise ValueError(f"PerceiverCrossAttention.heads={self.heads} does not divide the LM width {d}")
        super().attach(backbone, merge)
        # a child of the strategy: new parameters with it (`casa.fusion.base.mark_new`)
        self.resampler = Perceiver(d, self.num_latents, self.depth, self.heads, self.resampler_backend)

    def compress(self, image_embeds: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, d], counts [I] -> [I*Q, d], [I] all equal to Q."""
        return self.resampler(image_embeds, counts), torch.full_like(counts, self.num_latents)
