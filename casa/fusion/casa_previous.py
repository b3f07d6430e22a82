"""CASA whose windows keep the previous images too: another window rule, in one file.

CASA's rule (paper §3.2, B.2 "Attention windows"): a window is opened by an image and its
text sees that image only. Here the text of a window also sees the images of the `previous`
windows before it in the same sample, e.g. in a video the frame before the current one:

    sample:   t t [A] t t t [B] t t [C] t          previous = 1
    windows   0    1         2       3
    sees      -    A         A B     B C           (CASA: -, A, B, C)

Only the rule changes (`visible_windows`); the full forward, packed batches and KV-cached
generation all follow it (`casa.fusion.windows`, `casa.cache`: the cache keeps the images
of the last `previous` windows). Images keep the RoPE positions of their own window.
"""

from __future__ import annotations

from typing import Literal

from casa.fusion.casa import CASA


class CASAPrevious(CASA):
    """Args:
        previous: how many windows before its own a window also sees the images of (>= 1).
        The others: `casa.fusion.casa.CASA`'s.
    """

    name = "casa_previous"

    def __init__(self, previous: int = 1, mode: Literal["plus", "before", "replace"] = "plus",
                 placement: Literal["every_k", "first_k", "first_last_k"] = "every_k", k: int = 1,
                 image_ffn_updates: bool = False, inference_mask: Literal["self", "rnd", "rnd_txt"] | None = None,
                 mask_seed: int = 0, backend: Literal["dense", "sdpa", "eager", "flex", "flash"] | None = None):
        super().__init__(mode, placement, k, image_ffn_updates, inference_mask, mask_seed, backend)
        if isinstance(previous, bool) or not isinstance(previous, int) or previous < 1:
            raise ValueError(f"CASAPrevious.previous={previous!r} must be an int >= 1 (0 is CASA itself)")
        self.previous = previous

    def visible_windows(self, j: int) -> list[int]:
        """Window j of a sample sees windows j - previous .. j (those that exist)."""
        return list(range(max(0, j - self.previous), j + 1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, previous={self.previous}"
