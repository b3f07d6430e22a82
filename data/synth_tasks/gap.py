"""Protocol v2's tasks (docs/reproduction.md, "Protocol v2"): fine detail, digit reading and
a coarse control, all at the same resolution, with answers that no coarse cue predicts.

Each question is a task tag of a few characters, so a window holds the image's tokens
(64 at 224 px) against about 5-7 prompt tokens: image keys far outnumber text keys, as in
the paper's windows of ~1024 image tokens and tens of text tokens.

- `dot_color` ("dot"): a big shape and a small square dot, their colours drawn
  INDEPENDENTLY and uniformly from the 6 palette colours (they may be equal). Whatever a
  model sees of the big shape, the dot's colour keeps probability 1/6 each: the flaw of v1's
  `spot_color` (marker colour drawn to differ from the big shapes, so seeing only them gave
  1/4) cannot arise. The dot is ~9 px at 224 px, a third of one 28 px token's side.
- `big_color` ("big"): the SAME image distribution; the question asks the big shape's
  colour. The coarse control: same pixels, same answer set, same chance, same tokens; only
  the detail needed differs.
- `read_digit` ("digit"): one digit 0-9 in a ~14 px font (half a token high) at a random
  place among light distractor lines. Ten classes, scored exactly.

Answer sets (`ANSWERS`) are closed and known: teacher-forced scoring (`casa.answer_set`) ranks
exactly these candidates, and a uniform guess scores 1/6, 1/6 and 1/10.
"""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.synth_tasks.detail import printed_among_lines
from data.synth_tasks.render import COLORS, SHAPES, canvas, draw_shape, jitter, single_image_qa

COLOR_NAMES = tuple(sorted(COLORS))
DIGITS = tuple(str(d) for d in range(10))
DOT = 0.04  # dot side / image side: 9 px at 224 px
MARGIN = 3  # px between the dot and the big shape's bounding box: a same-coloured dot never merges with it
ANSWERS = {"dot_color": COLOR_NAMES, "big_color": COLOR_NAMES, "read_digit": DIGITS}
"""task -> its closed answer set (what teacher-forced scoring ranks)."""


def shape_and_dot(rng: random.Random, size: int):
    """-> (image, big shape's colour, dot's colour), the two colours independent and uniform."""
    big, dot = rng.choice(COLOR_NAMES), rng.choice(COLOR_NAMES)
    img = canvas(size)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.18, 0.3)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    draw_shape(d, rng.choice(SHAPES), cx, cy, r, jitter(rng, COLORS[big]))
    side = max(3, round(size * DOT))
    lo, hi = 1, size - side - 1
    for _ in range(1000):  # rejection: the dot lies clear of the big shape's bounding box
        x, y = rng.randint(lo, hi), rng.randint(lo, hi)
        if (x + side + MARGIN <= cx - r or x >= cx + r + MARGIN or y + side + MARGIN <= cy - r
                or y >= cy + r + MARGIN):
            break
    else:
        raise ValueError(f"dot_color image_size={size}: no room for the dot beside the big shape")
    # exact palette colour (no jitter): the tests find the dot by it
    d.rectangle([x, y, x + side - 1, y + side - 1], fill=COLORS[dot])
    return img, big, dot


def dot_color(rng: random.Random, size: int):
    """"dot" -> the small dot's colour (fine detail, independent of the big shape)."""
    img, _, dot = shape_and_dot(rng, size)
    return single_image_qa("dot", dot, img)


def big_color(rng: random.Random, size: int):
    """"big" -> the big shape's colour (the coarse control, same images as `dot_color`)."""
    img, big, _ = shape_and_dot(rng, size)
    return single_image_qa("big", big, img)


def digit_font_size(size: int) -> int:
    return max(8, size // 16)


def read_digit(rng: random.Random, size: int):
    """"digit" -> the one digit printed small among light lines (exact answer, 10 classes)."""
    value = rng.choice(DIGITS)
    img = printed_among_lines(rng, size, value, digit_font_size(size), "read_digit")
    return single_image_qa("digit", value, img)
