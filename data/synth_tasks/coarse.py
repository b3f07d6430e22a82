"""Coarse VQA (paper's "coarse" group): colours, shapes and counts of large objects.

These need no fine detail: a 56x56 image (4 visual tokens after the vision encoder's 2x2
merge) holds the answer, so a tiny model learns them in a few CPU minutes. They are the
sanity check of a fusion strategy, where the paper finds all strategies close.
"""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.synth_tasks.render import COLORS, SHAPES, canvas, draw_shape, jitter, single_image_qa

COLOR_NAMES = sorted(COLORS)
MAX_COUNT = 5
GRID = 3  # count: shapes sit in distinct cells of a GRID x GRID layout


def color(rng: random.Random, size: int):
    """One big shape of a palette colour (jittered) -> its colour word."""
    name = rng.choice(COLOR_NAMES)
    img = canvas(size)
    r = size * rng.uniform(0.22, 0.38)
    draw_shape(ImageDraw.Draw(img), rng.choice(SHAPES), rng.uniform(r, size - r), rng.uniform(r, size - r), r,
               jitter(rng, COLORS[name]))
    return single_image_qa("What colour is the shape?", name, img)


def shape(rng: random.Random, size: int):
    """One big shape of a random colour -> its shape word."""
    name = rng.choice(SHAPES)
    img = canvas(size)
    r = size * rng.uniform(0.25, 0.4)
    draw_shape(ImageDraw.Draw(img), name, rng.uniform(r, size - r), rng.uniform(r, size - r), r,
               jitter(rng, COLORS[rng.choice(COLOR_NAMES)]))
    return single_image_qa("What shape is it?", name, img)


def count(rng: random.Random, size: int):
    """1..MAX_COUNT shapes -> the digit. Each shape sits inside its own grid cell with a
    margin, so the objects never touch and the count is well posed (the tests count
    connected components)."""
    n = rng.randint(1, MAX_COUNT)
    img = canvas(size)
    d = ImageDraw.Draw(img)
    step = size / GRID
    for cell in rng.sample(range(GRID * GRID), n):
        cx, cy = (cell % GRID + 0.5) * step, (cell // GRID + 0.5) * step
        r = step * rng.uniform(0.22, 0.34)
        draw_shape(d, rng.choice(SHAPES), cx, cy, r, jitter(rng, COLORS[rng.choice(COLOR_NAMES)]))
    return single_image_qa("How many shapes are there?", str(n), img)
