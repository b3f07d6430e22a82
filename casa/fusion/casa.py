"""CASA: Cross-Attention via Self-Attention (paper §3, eq. 3).

In a CASA layer the text tokens of a window attend causally to the window's image tokens
*and* to the window's text up to themselves (`casa.fusion.windows`). The self term acts as
an implicit gate (Table 8, Fig. 7). Three ways to put CASA layers into a decoder:

    mode      paper   block computes                                   new parameters
    plus      CASA⊕   x + SA(n(x)) + CASA(n(x), images)                one attention per fused block
    before    CASA→   x + CASA(n_c(x), images), then x + SA(n(x))      one attention + norm per fused block
    replace   CASA∨   x + CASA_SA(n(x), images)  (the SA weights)      none

Which blocks are fused: `placement` every_k (blocks 0, k, 2k, ...), first_k (blocks 0..k-1)
or first_last_k (the first k and the last k). For plus/before the default k=1 with
every_k fuses every block, as in the paper; CASA∨ is ablated over placements (Table 7).

Names: the YAML/CLI arguments are the paper's (`mode`, `placement`); inside, as in every
strategy, where a fusion layer sits in a block is the block's `form` (`casa.blocks`:
"parallel", "before", "replace"; CASA⊕'s "plus" is the form "parallel") and which blocks
are fused is `which_blocks` (CASA's `placement`; `CrossAttention.placement` is a form).

Eq. 3's indicator 1[i > K]: in CASA⊕ and CASA→ the text of a sample before its first image
gets no update (its window has no key, `casa.fusion.windows`), so on text alone the model is
its backbone exactly; CASA∨'s layers *are* those blocks' SA, so there the text-only window
keeps windowed self-attention. Which images a window sees is `visible_windows` (the window
rule's one hook; `casa.fusion.casa_previous` overrides it).

`inference_mask` applies the paper's Table 8 masks (self, rnd, rnd_txt) in every CASA layer
when the model is in eval mode; training is never masked.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn

from casa.blocks import Before, Parallel, Replace
from casa.context import WindowIndex
from casa.fusion.base import mark_new
from casa.fusion.layers import WindowAttention, window_attention
from casa.fusion.windows import INFERENCE_MASKS, WindowedFusion, table8_masked_key

MODES = ("plus", "before", "replace")
FORM_OF_MODE = {"plus": "parallel", "before": "before", "replace": "replace"}
"""CASA's `mode` argument (the paper's names) -> the block form it composes (`casa.blocks`)."""
PLACEMENTS = ("every_k", "first_k", "first_last_k")


def fused_block_indices(placement: str, k: int, num_layers: int) -> list[int]:
    """Which blocks a placement fuses (pure; tested on its own). every_k: blocks 0, k, 2k, ...
    (the paper's "every 4th" CASA∨ layer, §4.2, is k = 4: blocks 0, 4, ..., 24 of Helium's 28;
    a k past the depth fuses block 0 only, so a 28-layer config runs on a 2-layer smoke model)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"CASA.placement={placement!r} is not one of {list(PLACEMENTS)}")
    if not 1 <= k <= (num_layers if placement != "every_k" else max(k, 1)):
        raise ValueError(f"CASA.k={k!r} must be between 1 and the number of layers ({num_layers})")
    if placement == "every_k":
        return list(range(0, num_layers, k))
    if placement == "first_k":
        return list(range(k))
    return sorted(set(range(k)) | set(range(num_layers - k, num_layers)))


class CASA(WindowedFusion):
    """Args:
        mode: "plus" (CASA⊕), "before" (CASA→) or "replace" (CASA∨).
        placement: which blocks: "every_k", "first_k" or "first_last_k".
        k: the placement's k.
        image_ffn_updates: image tokens go through each fused block's FFN (Table 5).
        inference_mask: None, "self", "rnd" or "rnd_txt" (Table 8; eval mode only).
        mask_seed: seed of the random masks.
        backend: attention backend of the CASA layers (default: the backbone's).
    """

    name = "casa"
    kind = "casa"

    def __init__(self, mode: Literal["plus", "before", "replace"] = "plus",
                 placement: Literal["every_k", "first_k", "first_last_k"] = "every_k", k: int = 1, image_ffn_updates: bool = False,
                 inference_mask: Literal["self", "rnd", "rnd_txt"] | None = None, mask_seed: int = 0,
                 backend: Literal["dense", "sdpa", "eager", "flex", "flash"] | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"CASA.mode={mode!r} is not one of {list(MODES)}")
        if placement not in PLACEMENTS:
            raise ValueError(f"CASA.placement={placement!r} is not one of {list(PLACEMENTS)}")
        if inference_mask is not None and inference_mask not in INFERENCE_MASKS:
            raise ValueError(f"CASA.inference_mask={inference_mask!r} is not one of {list(INFERENCE_MASKS)} or null")
        self.mode = mode
        # paper eq. 3's 1[i > K]: text before a sample's first image gets no CASA⊕/→ update;
        # CASA∨'s layers are the SA of those blocks, so its text-only windows keep windowed SA
        self.indicator = mode != "replace"
        self.placement = placement
        self.form = FORM_OF_MODE[mode]
        self.which_blocks = placement
        self.k = k
        self.image_ffn_updates = image_ffn_updates
        self.inference_mask = inference_mask
        self.mask_seed = mask_seed
        self.backend = backend
        self._layers: list[int] = []

    def attach(self, backbone: nn.Module, merge: int) -> None:
        super().attach(backbone, merge)
        self._layers = fused_block_indices(self.which_blocks, self.k, len(backbone.layers))
        for i in self._layers:
            block = backbone.layers[i]
            if self.form == "replace":
                # CASA∨: the block's own SA becomes a CASA layer, no new parameters
                if self.backend is not None:
                    block.attn_backend = self.backend
                block.fuse(Replace(functools.partial(window_attention, kind=self.kind)),
                           image_ffn_updates=self.image_ffn_updates)
                continue
            before = self.form == "before"
            layer = WindowAttention(block.self_attn, block.family, self.kind, self.backend or block.attn_backend,
                                    norm=block.input_layernorm if before else None)
            block.fuse(Before() if before else Parallel(), mark_new(layer), self.image_ffn_updates)

    def fused_layers(self) -> list[int]:
        return list(self._layers)

    def masked_key(self, index: WindowIndex) -> torch.Tensor | None:
        """The Table 8 mask of `inference_mask`, in eval mode only (a fresh seeded draw per forward)."""
        if self.inference_mask is None or self.training:
            return None
        return table8_masked_key(index, self.inference_mask, torch.Generator().manual_seed(self.mask_seed))
