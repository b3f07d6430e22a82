"""What casa's layers need to know about a backbone family, bound when the model is built.

One `Family` per entry of `casa.backbone.FAMILY_TABLE`; `Backbone` hands it to every
`DecoderBlock`, which hands it to the fusion layers built from the block. Nothing is found
out at run time (no probing of the rotary function, no class-name or attribute tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

ROPE_LAYOUTS = ("half", "interleaved")
"""How a family's rotary pairs dimensions: "half" (Llama, Qwen: i with i + D/2) or
"interleaved" (Helium: 2i with 2i + 1, cos/sin taken from their first half)."""

NORMS = ("rms", "other")
"""The decoder norms: "rms" computes w ⊙ x / sqrt(mean(x²) + variance_epsilon), which
`casa.image_kv` folds into the image K/V projection; "other" (Gemma's 1 + w, LayerNorm, ...)
runs through plain autograd."""


@dataclass(frozen=True)
class Family:
    """A backbone family's attention conventions.

    name: the `casa.backbone.FAMILIES` entry.
    rope_fn: the family's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) -> (q, k)`,
        imported from its Hugging Face modeling module.
    rope_layout: what rope_fn computes, one of `ROPE_LAYOUTS`, or None for a rotation casa does
        not rotate itself (then image keys go through rope_fn, unfused).
    norm: one of `NORMS`, the kind of `input_layernorm` (and of the fusion layers' copies).
    qk_norm: per-head RMSNorm on queries and keys before RoPE (`q_norm`, `k_norm`: Qwen3).
    """

    name: str
    rope_fn: Callable
    rope_layout: Literal["half", "interleaved"] | None
    norm: Literal["rms", "other"]
    qk_norm: bool

    def __post_init__(self):
        if self.rope_layout is not None and self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"Family.rope_layout={self.rope_layout!r} is not one of {list(ROPE_LAYOUTS)} or None")
        if self.norm not in NORMS:
            raise ValueError(f"Family.norm={self.norm!r} is not one of {list(NORMS)}")
