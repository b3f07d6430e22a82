"""CASA-Shared: CASA layers that run with their block's own self-attention weights.

kyutai's "-Shared" releases (CASA-Helium1-VL-2B-Shared, CASA-Qwen2_5-VL-3B-Shared: "the
self-attention and cross-attention layers in the same block share the same weights") keep
CASA's block layout but give the CASA layer no projections of its own: the q, k, v, o
projections that compute SA(n(x)) over the text also compute CASA(n(x), images) over the
window. CASA (`casa.fusion.casa`) instead initialises each CASA layer as a *copy* of them:

    mode     paper   block computes                                   new parameters
    plus     CASA⊕   x + SA(n(x)) + CASA_SA(n(x), images)             none
    before   CASA→   x' = x + CASA_SA(n_c(x), images); x' + SA(n(x'))  n_c: one norm (d) per block
    replace  CASA∨   already shares: the block's SA *is* its CASA layer (use `CASA(mode="replace")`)

where CASA_SA is `casa.fusion.layers.window_attention` run with the block's `self_attn`.
The layer holds that module by reference, not as a child: the weights are the same
`nn.Parameter`s (a gradient from either path lands in one `.grad`), the state dict has no
`fusion_attn.attn.*` keys (the pretrained keys are all there is; a checkpoint is the
backbone's layout plus n_c for CASA→), and FSDP2's `fully_shard` per block (the block owns
`self_attn`) gathers them once for both uses.

What kyutai's release and the paper leave open, and what is chosen here:

- Which projections: all of the attention module, q_proj, k_proj, v_proj, o_proj (and
  Qwen3's per-head q_norm / k_norm, which live in it): "share the same weights". RoPE is the
  backbone's in both (no weights).
- Norms. CASA⊕: the CASA path reads the SA's normalised input n(x), as CASA⊕ always does, so
  the image tokens take `input_layernorm` too; nothing to choose. CASA→: the CASA layer reads
  x and SA reads x' = x + CASA(...), two different inputs; it keeps CASA→'s own pre-norm n_c
  (a copy of `input_layernorm`, new, trained). With tied projections this per-channel gain is
  the one place the two paths can differ, for d parameters per block, and with it CASA-Shared→
  differs from CASA→ by the tie alone.
- What trains. Nothing new in CASA⊕ (n_c in CASA→). The shared projections are pretrained
  parameters: they train with the backbone at the pretrained learning rate (kyutai fully
  fine-tune the LLM alongside the CASA layers), and a frozen backbone freezes them, as it does
  CASA∨'s. With a frozen backbone only the projector (and n_c) then learn the fusion.

The window rule, KV cache (`casa.cache`: the window cache per fused block, as CASA⊕),
Table 8 masks, attention capture and placements are CASA's (this is a `CASA`).
"""

from __future__ import annotations

import copy
from typing import Literal

from torch import nn

from casa.attention import AttentionBackend
from casa.blocks import Before, Parallel
from casa.family import Family
from casa.fusion.base import mark_new
from casa.fusion.casa import CASA, fused_block_indices
from casa.fusion.layers import WindowAttention

SHARED_MODES = ("plus", "before")


class SharedWindowAttention(WindowAttention):
    """The fusion layer of a CASA-Shared block: `WindowAttention` (its backend binding and
    forward) over the block's own SA module instead of a copy.

    Args:
        self_attn: the block's SA module, held by reference (`attn`, not a child: no new keys,
            the same parameters as the block's `self_attn`).
        family: the backbone family's conventions (`casa.family.Family`).
        kind: the window index it reads ("casa").
        backend: attention backend (name), bound once (`kernel`).
        norm: for CASA→, the block's input norm, copied as this layer's own pre-norm (`norm`).
    """

    def __init__(self, self_attn: nn.Module, family: Family, kind: str, backend: str,
                 norm: nn.Module | None = None):
        nn.Module.__init__(self)  # not WindowAttention's, which copies self_attn
        object.__setattr__(self, "attn", self_attn)  # bypasses nn.Module registration: shared, not owned
        self.norm = None
        if norm is not None:
            self.norm = copy.deepcopy(norm)
            for p in self.norm.parameters():
                p.requires_grad_(True)  # new: trains even when the backbone is frozen
        self.gate = None
        self.family = family
        self.kind = kind
        self.backend = backend
        self.window_backend: AttentionBackend | None = None  # a model mode's override (capture, masks)

    def extra_repr(self) -> str:
        return f"shares=self_attn, kind={self.kind}, backend={self.backend}"


class CASAShared(CASA):
    """Args:
        mode: "plus" (CASA-Shared⊕) or "before" (CASA-Shared→); CASA∨ ("replace") already runs
            CASA with the block's SA weights: it is `casa.fusion.CASA(mode="replace")`.
        The others: `casa.fusion.casa.CASA`'s (placement, k, image_ffn_updates, inference_mask,
        mask_seed, backend).
    """

    name = "casa_shared"
    shares_attention = True
    """The fusion layers compute with the block's SA parameters (`casa.flops`: they train
    exactly when the backbone does)."""

    def __init__(self, mode: Literal["plus", "before"] = "plus",
                 placement: Literal["every_k", "first_k", "first_last_k"] = "every_k", k: int = 1,
                 image_ffn_updates: bool = False, inference_mask: Literal["self", "rnd", "rnd_txt"] | None = None,
                 mask_seed: int = 0, backend: Literal["dense", "sdpa", "eager", "flex", "flash"] | None = None):
        if mode not in SHARED_MODES:
            hint = (" (CASA∨ already shares: its CASA layers are the blocks' SA; use casa.fusion.CASA "
                    "with mode: replace)") if mode == "replace" else ""
            raise ValueError(f"CASAShared.mode={mode!r} is not one of {list(SHARED_MODES)}{hint}")
        super().__init__(mode, placement, k, image_ffn_updates, inference_mask, mask_seed, backend)

    def attach(self, backbone: nn.Module, merge: int) -> None:
        super(CASA, self).attach(backbone, merge)  # WindowedFusion's: merge, M-RoPE
        self._layers = fused_block_indices(self.which_blocks, self.k, len(backbone.layers))
        before = self.form == "before"
        for i in self._layers:
            block = backbone.layers[i]
            layer = SharedWindowAttention(block.self_attn, block.family, self.kind, self.backend or block.attn_backend,
                                          norm=block.input_layernorm if before else None)
            block.fuse(Before() if before else Parallel(), mark_new(layer), self.image_ffn_updates)
