"""Cross-attention fusion (Flamingo / Llama 3-V style) and its gated variant.

A `WindowAttention` layer of kind "cross_attention" is added to every `every`-th block:
the text of a window attends (not causally) to that window's image tokens only. Text
before a conversation's first image receives nothing (zero-key window). Placement:
`parallel` sums it with the block's SA, `before` runs it (with its own pre-norm) before SA.

The gated variant multiplies the layer's output by tanh(g), g initialised at 0, so a gated
model is exactly its backbone at initialisation (checked in the tests).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from casa.blocks import Before, Parallel
from casa.fusion.base import mark_new
from casa.fusion.layers import WindowAttention
from casa.fusion.windows import WindowedFusion

PLACEMENTS = ("parallel", "before")


class CrossAttention(WindowedFusion):
    """Args:
        placement: where in the block (its form, `casa.blocks`): "parallel" (summed with SA)
            or "before" (before SA, own pre-norm).
        every: add a CA layer to blocks 0, every, 2*every, ...
        image_ffn_updates: pass image tokens through each fused block's FFN (paper Table 5).
        backend: attention backend of the CA layers (default: the backbone's).
    """

    name = "cross_attention"
    kind = "cross_attention"
    gated = False

    def __init__(self, placement: Literal["parallel", "before"] = "parallel", every: int = 1, image_ffn_updates: bool = False,
                 backend: Literal["dense", "sdpa", "eager", "flex", "flash"] | None = None):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"{type(self).__name__}.placement={placement!r} is not one of {list(PLACEMENTS)}")
        if every < 1:
            raise ValueError(f"{type(self).__name__}.every={every!r} must be >= 1")
        self.placement = placement
        self.form = placement
        self.every = every
        self.image_ffn_updates = image_ffn_updates
        self.backend = backend
        self._layers: list[int] = []

    def attach(self, backbone: nn.Module, merge: int) -> None:
        super().attach(backbone, merge)
        before = self.form == "before"
        for i, block in enumerate(backbone.layers):
            if i % self.every:
                continue
            layer = WindowAttention(block.self_attn, block.family, self.kind, self.backend or block.attn_backend,
                                    gated=self.gated, norm=block.input_layernorm if before else None)
            block.fuse(Before() if before else Parallel(), mark_new(layer), self.image_ffn_updates)
            self._layers.append(i)

    def fused_layers(self) -> list[int]:
        return list(self._layers)


class GatedCrossAttention(CrossAttention):
    name = "gated_cross_attention"
    gated = True

    def gate_values(self, backbone: nn.Module) -> dict[int, float]:
        """tanh(gate) per fused layer (the gate monitor callback plots these)."""
        return {i: float(torch.tanh(backbone.layers[i].fusion_attn.gate.detach()).item()) for i in self._layers}
