"""Coarse VQA: colours, shapes and counts of large objects (learnable from a few tokens)."""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.format import encode_image, image, text
from data.synth_tasks.render import COLORS, SHAPES, canvas, draw_shape, jitter


def _qa(question: str, answer: str, img) -> tuple[dict, dict]:
    conv = {"messages": [{"role": "user", "content": [image("img0"), text(question)]},
                         {"role": "assistant", "content": [text(answer)]}]}
    return conv, {"img0.png": encode_image(img)}


def color(rng: random.Random, size: int):
    name = rng.choice(sorted(COLORS))
    img = canvas(size)
    r = size * rng.uniform(0.22, 0.38)
    c = rng.uniform(r, size - r)
    draw_shape(ImageDraw.Draw(img), rng.choice(SHAPES), c, rng.uniform(r, size - r), r, jitter(rng, COLORS[name]))
    return _qa("What colour is the shape?", name, img)


def shape(rng: random.Random, size: int):
    name = rng.choice(SHAPES)
    img = canvas(size)
    r = size * rng.uniform(0.25, 0.4)
    draw_shape(ImageDraw.Draw(img), name, rng.uniform(r, size - r), rng.uniform(r, size - r), r,
               jitter(rng, COLORS[rng.choice(sorted(COLORS))]))
    return _qa("What shape is it?", name, img)


def count(rng: random.Random, size: int):
    n = rng.randint(1, 5)
    img = canvas(size)
    d = ImageDraw.Draw(img)
    cells = rng.sample(range(9), n)  # a 3x3 grid keeps the objects apart, so counting is well posed
    step = size / 3
    for cell in cells:
        cx, cy = (cell % 3 + 0.5) * step, (cell // 3 + 0.5) * step
        draw_shape(d, rng.choice(SHAPES), cx, cy, step * 0.32, jitter(rng, COLORS[rng.choice(sorted(COLORS))]))
    return _qa("How many shapes are there?", str(n), img)
