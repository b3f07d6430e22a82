"""Projector from the vision encoder's width to the language model's: [N, in_dim] -> [N, out_dim].

Kinds (the YAML `projector:` value):
    mlp       Linear(in, out) - GELU - Linear(out, out): LLaVA-1.5's two-layer projector, the
              default when the LM is not the vision tower's own (Helium).
    linear    one Linear(in, out): the LLaVA-1 ablation.
    identity  no parameters; needs in_dim == out_dim. For an LM the tower was trained with
              (Qwen2.5-VL: the merger already outputs the LM width), so image tokens arrive
              exactly as the original VLM saw them.
All projector parameters are new (trained at the new-parameter learning rate).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("mlp", "linear", "identity")


class Projector(nn.Module):
    """image_embeds [N, in_dim] -> [N, out_dim].

    Args:
        in_dim: the vision encoder's output width (`VisionEncoder.out_dim`).
        out_dim: the language model's hidden size d.
        kind: one of `KINDS`.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Projector.{name}={value!r} must be a positive int")
        if kind not in KINDS:
            raise ValueError(f"Projector.kind={kind!r} is not one of {list(KINDS)}")
        if kind == "identity" and in_dim != out_dim:
            raise ValueError(f"Projector.kind='identity' needs in_dim == out_dim, got in_dim={in_dim} (vision) "
                             f"and out_dim={out_dim} (LM); use 'mlp' or 'linear'")
        self.kind = kind
        self.in_dim = in_dim
        self.out_dim = out_dim
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Identity()

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> [N, out_dim]"""
        if image_embeds.shape[-1] != self.in_dim:
            raise ValueError(f"Projector: expected image_embeds [N, {self.in_dim}], got {list(image_embeds.shape)}")
        return self.net(image_embeds)
