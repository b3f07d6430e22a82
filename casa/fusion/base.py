"""The contract every fusion strategy implements.

A `FusionStrategy` decides three things, and nothing else differs between strategies:

1. what it adds to the decoder (`attach`, once, at build time): nothing (insertion), a
   Q-Former (qformer), a `WindowAttention` layer in some blocks (CA, gated CA, CASA⊕,
   CASA→), or a switch of some blocks' SA to windowed attention (CASA∨, no parameters);
2. how a packed batch becomes the blocks' input (`prepare`, once per forward):
       text_embeds [T, d], image_embeds [N, d]
         -> stream [L, d]   (L = T for windowed strategies, T + N' for insertion)
            images [N', d]  (the image tokens fused layers attend to; empty for insertion)
            StreamContext   (sample boundaries, RoPE tables, window index)
3. where the text positions are in the output stream (`text_states`: [L, d] -> [T, d]).

Every parameter a strategy creates is *new* (it gets the new-parameter learning rate);
pretrained backbone keys are never renamed (`DecoderBlock` keeps the HF child names).
"""

from __future__ import annotations

import torch
from torch import nn

from casa.batch import PackedBatch
from casa.context import StreamContext


class FusionStrategy(nn.Module):
    name = "base"

    def __init__(self) -> None:
        super().__init__()
        self.merge = 2
        self.mrope = False

    def attach(self, backbone: nn.Module, merge: int) -> None:
        """Rewrite the backbone's blocks for this strategy (build time, called once by the model).

        merge: the vision encoder's spatial merge (image i has t*h*w / merge**2 tokens)."""
        self.merge = merge
        self.mrope = bool(getattr(backbone, "mrope", False))

    def prepare(self, batch: PackedBatch, text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                backbone: nn.Module) -> tuple[torch.Tensor, torch.Tensor, StreamContext]:
        raise NotImplementedError(f"{type(self).__name__} must implement prepare()")

    def text_states(self, stream: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        """[L, d] -> [T, d] hidden states at the text positions (identity for windowed fusion)."""
        return stream

    def fused_layers(self) -> list[int]:
        """Indices of the blocks this strategy changed (for attention capture and docs)."""
        return []

    def extra_repr(self) -> str:
        return f"name={self.name}"
