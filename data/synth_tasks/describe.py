"""Held-out text for the LM's own ability (paper §3 / Table 8: CASA's self term as an
implicit gate that protects the LM's text modelling; measured here as perplexity).

`describe` is a one-sentence scene description from a small grammar, a text-only
conversation; `describe_after_image` is the same kind of sentence after an *unrelated*
image. The protocol's LM is pretrained on such sentences (experiments/pretrain.py) and the
fusion runs never train on them: their answer loss after fusion training is the held-out
text perplexity, without an image (what the LM keeps) and after one (what the fusion layers
do to text that does not need the image: an ungated cross-attention layer updates every
text token after an image; CASA's self term can leave them alone).
"""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.format import text
from data.synth_tasks.render import COLORS, SHAPES, canvas, draw_shape, jitter, single_image_qa

RELATIONS = ("left of", "right of", "above", "below", "near")
PROMPT = "Describe a scene."


def sentence(rng: random.Random) -> str:
    """"red circle left of blue square": two distinct colours, two shapes, one relation
    (at most 40 characters, the synthetic benchmark's answer limit)."""
    c1, c2 = rng.sample(sorted(COLORS), 2)
    return f"{c1} {rng.choice(SHAPES)} {rng.choice(RELATIONS)} {c2} {rng.choice(SHAPES)}"


def describe(rng: random.Random, size: int):
    """Text-only: "Describe a scene." -> one sentence (`size` unused: no image)."""
    return text_only_qa(PROMPT, sentence(rng))


def describe_after_image(rng: random.Random, size: int):
    """An unrelated image (one random shape), then the same prompt -> one sentence."""
    img = unrelated_image(rng, size)
    return single_image_qa(PROMPT, sentence(rng), img)


def text_only_qa(prompt: str, answer: str):
    """A one-turn text-only conversation (no image) -> (conversation, {})."""
    return {"messages": [{"role": "user", "content": [text(prompt)]},
                         {"role": "assistant", "content": [text(answer)]}]}, {}


def unrelated_image(rng: random.Random, size: int):
    """One random shape of a random colour: an image the question after it does not ask about."""
    img = canvas(size)
    r = size * rng.uniform(0.2, 0.35)
    draw_shape(ImageDraw.Draw(img), rng.choice(SHAPES), rng.uniform(r, size - r), rng.uniform(r, size - r), r,
               jitter(rng, COLORS[rng.choice(sorted(COLORS))]))
    return img
