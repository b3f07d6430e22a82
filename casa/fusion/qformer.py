"""Q-Former compression followed by token insertion: every image enters the stream as Q
learned query tokens instead of its t*h*w/4 tokens. Two forms (`QFormer.form`):

* "joint", the paper's (§4.4, "Link to token compression"): "a small transformer block is
  applied to the N image tokens produced by the vision encoder, alongside Q << N learnable
  queries; only the Q queries are then inserted". One pre-norm transformer layer over
  [image_i | queries] per image (bidirectional self-attention within the image's segment,
  then an MLP), `depth` times; the queries' rows are kept:

      image i  [n_i, d] ─┐
                         ├─ [n_i + Q, d] ── block ── ... ── rows n_i.. ──> [Q, d]
      queries  [Q, d]   ─┘

* "blip2" (BLIP-2, Li et al. 2023): the queries self-attend, then cross-attend to the image
  tokens, then an MLP; the image tokens are keys/values only.

The paper's baseline uses Q in {32, 128} (Table 6b) and 64 (App. D). Compressed tokens have
no spatial grid, so under M-RoPE they take 1-D positions (all three components equal;
`casa.positions.image_rope_positions`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from casa.attention import make_backend
from casa.fusion.insertion import Insertion

FORMS = ("joint", "blip2")


class QFormerLayer(nn.Module):
    """BLIP-2's layer, pre-norm: queries <- queries + SA(q); + CA(q -> image); + MLP. All [I*Q, d]."""

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


class JointBlock(nn.Module):
    """The paper's block: a plain pre-norm transformer layer over segments (one per image,
    [image_i | queries]), bidirectional within a segment:
    x <- x + SA(norm1(x)); x <- x + MLP(norm2(x)). x [L, d], cu [I+1] -> [L, d].
    Parameters as `torch.nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`'s
    (in_proj -> qkv, out_proj -> out, linear1/2 -> mlp), its reference in the tests."""

    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.heads = heads
        self.kernel = make_backend(backend)  # resolved and validated once, at build time
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        L, d = x.shape
        H = self.heads
        q, k, v = self.qkv(self.norm1(x)).view(L, 3, H, d // H).unbind(1)  # 3 x [L, H, D]
        x = x + self.out(self.kernel(q, k, v, cu, cu, causal=False).reshape(L, d))
        return x + self.mlp(self.norm2(x))


class QFormer(Insertion):
    """Args:
        num_queries: Q tokens per image (paper: 32, 64 or 128).
        depth: transformer layers (the paper's form: one block).
        heads: attention heads (the LM width must be divisible by it).
        backend: attention backend inside the Q-Former.
        form: "joint" (the paper's: one transformer over [image tokens | queries], the
            queries kept) or "blip2" (queries self-attend and cross-attend to the image).
    """

    name = "qformer"

    def __init__(self, num_queries: int = 64, depth: int = 2, heads: int = 4,
                 backend: Literal["dense", "sdpa", "eager", "flex", "flash"] = "sdpa",
                 form: Literal["joint", "blip2"] = "blip2"):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"QFormer.num_queries={num_queries!r} must be >= 1 (paper: 32, 64 or 128)")
        if depth < 1:
            raise ValueError(f"QFormer.depth={depth!r} must be >= 1")
        if form not in FORMS:
            raise ValueError(f"QFormer.form={form!r} is not one of {list(FORMS)}")
        self.num_queries, self.depth, self.heads, self.backend, self.form = num_queries, depth, heads, backend, form
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
        layer = JointBlock if self.form == "joint" else QFormerLayer
        self.layers = nn.ModuleList(layer(d, self.heads, self.backend) for _ in range(self.depth))
        self.norm_out = nn.LayerNorm(d)

    def compress(self, image_embeds: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, d], counts [I] -> [I*Q, d], [I] all equal to Q."""
        I, Q = counts.shape[0], self.num_queries
        dev = image_embeds.device
        if self.form == "joint":
            return self.norm_out(self._joint(image_embeds, counts.to(dev).long())), torch.full_like(counts, Q)
        x = self.queries.to(image_embeds.dtype).repeat(I, 1)  # [I*Q, d]
        cu_q = (torch.arange(I + 1, device=dev) * Q).to(torch.int32)
        cu_k = F.pad(counts.cumsum(0), (1, 0)).to(device=dev, dtype=torch.int32)
        for layer in self.layers:
            x = layer(x, image_embeds, cu_q, cu_k)
        return self.norm_out(x), torch.full_like(counts, Q)

    def _joint(self, image_embeds: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The paper's form: [N, d], counts [I] -> the queries' rows [I*Q, d] after the blocks
        over [image_i | queries] per image."""
        I, Q = counts.shape[0], self.num_queries
        dev = image_embeds.device
        before = counts.cumsum(0) - counts  # [I] image tokens of earlier images
        image_of = torch.repeat_interleave(torch.arange(I, device=dev), counts)  # [N]
        # segment i: image i's tokens after the queries of earlier images, then its queries
        image_rows = torch.arange(image_embeds.shape[0], device=dev) + image_of * Q  # [N]
        query_rows = ((before + counts + torch.arange(I, device=dev) * Q).repeat_interleave(Q)
                      + torch.arange(Q, device=dev).repeat(I))  # [I*Q]
        cu = F.pad((counts + Q).cumsum(0), (1, 0)).to(torch.int32)  # [I+1]
        queries = self.queries.to(image_embeds.dtype).repeat(I, 1)  # [I*Q, d]
        x = image_embeds.new_empty(image_embeds.shape[0] + I * Q, image_embeds.shape[1])
        x = x.index_copy(0, image_rows, image_embeds).index_copy(0, query_rows, queries)  # [N + I*Q, d]
        for block in self.layers:
            x = block(x, cu)
        return x[query_rows]  # [I*Q, d]
