"""Held-out text for protocol v2's text-ability probe (docs/reproduction.md, "Protocol v2"):
short phrases whose windows are no longer than the training windows.

v1 scored `describe_after_image` on windows of 45-60 tokens while its training windows held
at most 41, so the scored positions had never been supervised after an image. Here the tag
"say" and a colour-shape phrase ("blue square") give windows of 12-19 text tokens after the
image, and the probe scores per window position (`experiments.evaluate --position-loss`), so
positions beyond the longest training window (12 tokens) can be left out.

- `phrase`: text only ("say" -> phrase): what the LM keeps.
- `phrase_after_image`: an unrelated 224 px image first: what the fusion layers do to text that
  does not need the image.
"""

from __future__ import annotations

import random

from data.synth_tasks.describe import text_only_qa, unrelated_image
from data.synth_tasks.render import COLORS, SHAPES, single_image_qa

TAG = "say"


def words(rng: random.Random) -> str:
    return f"{rng.choice(sorted(COLORS))} {rng.choice(SHAPES)}"


def phrase(rng: random.Random, size: int):
    """Text only: "say" -> "<colour> <shape>" (`size` unused: no image)."""
    return text_only_qa(TAG, words(rng))


def phrase_after_image(rng: random.Random, size: int):
    """An unrelated image (one shape of another draw), then "say" -> "<colour> <shape>"."""
    img = unrelated_image(rng, size)  # drawn before the words: the rng's order fixes the data
    return single_image_qa(TAG, words(rng), img)
