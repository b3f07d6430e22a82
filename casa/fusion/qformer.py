"""Q-Former compression (BLIP-2 style) followed by token insertion.

Q learned queries attend to the image tokens of each image through a small transformer
(self-attention among the queries, cross-attention to the image, MLP), so every image
enters the stream as Q tokens instead of t*h*w/4. The paper's baseline uses Q in
{32, 64, 128}. Compressed tokens have no spatial grid, so under M-RoPE they take 1-D
positions (all three components equal; `casa.positions.image_rope_positions`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from casa.attention import make_backend
from casa.fusion.insertion import Insertion


class QFormerLayer(nn.Module):
    """Pre-norm: queries <- queries + SA(q); + CA(q -> image); + MLP. All [I*Q, d]."""

    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.heads = heads
        self.kernel = make_backend(backend)  # resolved and validated once, at build time
        self.norm_sa, self.norm_ca, self.norm_kv, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(4))
        self.sa_qkv = nn.Linear(dim, 3 * dim)
        self.sa_out = nn.Linear(dim, dim)
        self.ca_q = nn.Linear(dim, dim)
        self.ca_kv = nn.Linear(dim, 2 * dim)
        self.ca_out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, image: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
        L, d = x.shape
        H = self.heads
        q, k, v = self.sa_qkv(self.norm_sa(x)).view(L, 3, H, d // H).unbind(1)  # 3 x [L, H, D]
        x = x + self.sa_out(self.kernel(q, k, v, cu_q, cu_q, causal=False).reshape(L, d))
        q = self.ca_q(self.norm_ca(x)).view(L, H, d // H)  # [L, H, D]
        k, v = self.ca_kv(self.norm_kv(image)).view(-1, 2, H, d // H).unbind(1)  # 2 x [N, H, D]
        x = x + self.ca_out(self.kernel(q, k, v, cu_q, cu_k, causal=False).reshape(L, d))
        return x + self.mlp(self.norm_mlp(x))


class QFormer(Insertion):
    """Args:
        num_queries: Q tokens per image (paper: 32, 64 or 128).
        depth: transformer layers.
        heads: attention heads (the LM width must be divisible by it).
        backend: attention backend inside the Q-Former.
    """

    name = "qformer"

    def __init__(self, num_queries: int = 64, depth: int = 2, heads: int = 4,
                 backend: Literal["dense", "sdpa", "eager", "flex", "flash"] = "sdpa"):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"QFormer.num_queries={num_queries!r} must be >= 1 (paper: 32, 64 or 128)")
        if depth < 1:
            raise ValueError(f"QFormer.depth={depth!r} must be >= 1")
        self.num_queries, self.depth, self.heads, self.backend = num_queries, depth, heads, backend
        self.compressed_tokens = num_queries
        self.queries: nn.Parameter | None = None
        self.layers = nn.ModuleList()
        self.norm_out: nn.Module | None = None

    def attach(self, backbone: nn.Module, merge: int) -> None:
        super().attach(backbone, merge)
        d = backbone.hidden_size
        if d % self.heads:
            raise ValueError(f"QFormer.heads={self.heads} does not divide the LM width {d}")
        self.queries = nn.Parameter(torch.randn(self.num_queries, d) * 0.02)
        self.layers = nn.ModuleList(QFormerLayer(d, self.heads, self.backend) for _ in range(self.depth))
        self.norm_out = nn.LayerNorm(d)

    def compress(self, image_embeds: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, d], counts [I] -> [I*Q, d], [I] all equal to Q."""
        I, Q = counts.shape[0], self.num_queries
        dev = image_embeds.device
        x = self.queries.to(image_embeds.dtype).repeat(I, 1)  # [I*Q, d]
        cu_q = (torch.arange(I + 1, device=dev) * Q).to(torch.int32)
        cu_k = F.pad(counts.cumsum(0), (1, 0)).to(device=dev, dtype=torch.int32)
        for layer in self.layers:
            x = layer(x, image_embeds, cu_q, cu_k)
        return self.norm_out(x), torch.full_like(counts, Q)
