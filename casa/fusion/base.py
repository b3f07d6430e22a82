"""The contract every fusion strategy implements.

A `FusionStrategy` decides four things, and nothing else differs between strategies:

1. what it adds to the decoder (`attach`, once, at build time): nothing (insertion), a
   Q-Former or a Perceiver resampler (its own children), and/or a composition of some
   blocks (`casa.blocks.DecoderBlock.fuse`: an attention step such as `Parallel`, `Before`
   or `Replace`, with its fusion layer);
2. how the image tokens are compressed before they reach the decoder (`compress`: identity,
   or Q learned queries per image for the Q-Former and the Perceiver), whichever way they
   reach it afterwards (inserted in the stream, or attended to by cross-attention);
3. how a packed batch becomes the blocks' input (`prepare`, once per forward):
       text_embeds [T, d], image_embeds [N, d]
         -> stream [L, d]   (L = T for windowed strategies, T + N' for insertion)
            images [N', d]  (the image tokens fused layers attend to; empty for insertion)
            StreamContext   (sample boundaries, RoPE tables, window index)
4. where the text positions are in the output stream (`text_states`: [L, d] -> [T, d]).

Every parameter a strategy creates is *new* (it gets the new-parameter learning rate), and
is marked so where it is created (`mark_new`): the strategy's own children are (the model
marks the strategy), and a fusion layer a strategy adds to a block is marked by the strategy.
Pretrained backbone keys are never renamed (`DecoderBlock` keeps the HF child names).
"""

from __future__ import annotations

import torch
from torch import nn

from casa.batch import PackedBatch
from casa.context import StreamContext

_NEW = "_casa_new_parameters"


def mark_new(module: nn.Module) -> nn.Module:
    """Mark every parameter under `module` as new (trained at the new-parameter learning rate,
    `VisionLanguageModel.parameter_groups`) -> module. The mark is on the module, so it
    survives FSDP2's conversion of parameters to DTensors."""
    setattr(module, _NEW, True)
    return module


def new_parameter_names(root: nn.Module) -> set[str]:
    """Names (relative to root) of the parameters under a module marked by `mark_new`."""
    names = set()
    for prefix, module in root.named_modules():
        if getattr(module, _NEW, False):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    return names


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

    #: tokens per image after `compress` when it resamples every image to a fixed count (Q-Former,
    #: Perceiver), None when images pass unchanged: with it the host max lengths flash-attn
    #: needs are bounded without reading counts back (`compressed_bound`)
    compressed_tokens: int | None = None

    def compressed_bound(self, num_images: int) -> int | None:
        """Host upper bound on the compressed image tokens of any one sample or window of a
        batch with `num_images` images (flash-attn's max_seqlen may exceed the true maximum;
        the kernel reads the exact lengths from cu_seqlens), or None if unknown."""
        return None if self.compressed_tokens is None else self.compressed_tokens * num_images

    def compress(self, image_embeds: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image tokens the decoder receives: image_embeds [N, d], counts [I] tokens per
        image -> ([N', d], counts' [I], or None when the images are passed unchanged).
        Compressed tokens have no spatial grid: they take 1-D positions (`casa.positions`)."""
        return image_embeds, None

    def prepare(self, batch: PackedBatch, text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                backbone: nn.Module) -> tuple[torch.Tensor, torch.Tensor, StreamContext]:
        raise NotImplementedError(f"{type(self).__name__} must implement prepare()")

    def text_states(self, stream: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        """[L, d] -> [T, d] hidden states at the text positions (identity for windowed fusion)."""
        return stream

    def fused_layers(self) -> list[int]:
        """Indices of the blocks this strategy composed (for attention capture and docs)."""
        return []

    def extra_repr(self) -> str:
        return f"name={self.name}"
