"""Projector from the vision encoder's width to the language model's: [N, in_dim] -> [N, out_dim].

`mlp` (Linear-GELU-Linear, LLaVA-1.5's choice) is the default; `linear` and `identity`
(when the vision merger already outputs the LM width, as in Qwen2.5-VL) are ablations.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("mlp", "linear", "identity")


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Projector.kind={kind!r} is not one of {list(KINDS)}")
        if kind == "identity" and in_dim != out_dim:
            raise ValueError(f"Projector.kind='identity' needs equal widths, got vision {in_dim} -> LM {out_dim}")
        self.kind = kind
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Identity()

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.net(image_embeds)
