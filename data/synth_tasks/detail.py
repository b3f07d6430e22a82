"""Fine detail and text reading that a coarse view loses, sized to be learnt by the
protocol's tiny models (docs/reproduction.md): the separating tasks of paper §4.4 / Table 6
(charts, documents and text reading, where cross-attention falls behind insertion), made
small enough to be learnt in minutes on a CPU, which `reading`/`ocr` are not at this scale.

- `spot_color`: a 112 px image (16 visual tokens) with two big distractor shapes and one
  small square marker; the question asks the marker's colour. The marker covers ~2 % of one
  28 px token: a pooled or compressed view keeps the big shapes' colours and loses it.
- `read_number`: one two-digit number printed in a ~14 px font at a random place among
  light distractor lines; the question asks it. Ten glyph classes, two positions: the
  easiest text reading that still needs the glyph pixels.
"""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.synth_tasks.render import COLORS, INK, PAPER, SHAPES, canvas, draw_shape, font, jitter, single_image_qa, textsize

COLOR_NAMES = sorted(COLORS)
MARKER = 0.06  # marker side / image side: 6-7 px at 112 px, a fraction of one 28 px token


def spot_color(rng: random.Random, size: int):
    """Two big shapes and a small marker of a third colour -> "What colour is the small square?"."""
    big_a, big_b, small = rng.sample(COLOR_NAMES, 3)
    img = canvas(size)
    d = ImageDraw.Draw(img)
    for name in (big_a, big_b):
        r = size * rng.uniform(0.14, 0.22)
        draw_shape(d, rng.choice(SHAPES), rng.uniform(r, size - r), rng.uniform(r, size - r), r,
                   jitter(rng, COLORS[name]))
    side = max(3, round(size * MARKER))
    x, y = rng.randrange(1, size - side - 1), rng.randrange(1, size - side - 1)
    # drawn last, on top: always fully visible, never hidden by a big shape
    d.rectangle([x, y, x + side - 1, y + side - 1], fill=COLORS[small])
    return single_image_qa("What colour is the small square?", small, img)


def font_size(size: int) -> int:
    return max(8, size // 8)


def read_number(rng: random.Random, size: int):
    """A two-digit number (10-99) printed small on paper among light lines -> the number."""
    value = str(rng.randint(10, 99))
    img = printed_among_lines(rng, size, value, font_size(size), "read_number")
    return single_image_qa("What number is written?", value, img)


def printed_among_lines(rng: random.Random, size: int, text: str, fs: int, task: str):
    """A paper canvas with 2-4 light distractor lines and `text` printed in ink at `fs` px, at a
    random place, on a paper box the lines never cross (read_number, read_digit)."""
    img = canvas(size, PAPER)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):  # distractors lighter than the ink, never touching the label
        d.line([(rng.randrange(size), rng.randrange(size)), (rng.randrange(size), rng.randrange(size))],
               fill=jitter(rng, (180, 180, 180), 25), width=1)
    tw, th = textsize(text, fs)
    if tw + 4 >= size or th + 4 >= size:
        raise ValueError(f"{task} image_size={size} is too small for {fs} px text (needs > {max(tw, th) + 4})")
    x, y = rng.randint(2, size - tw - 2), rng.randint(2, size - th - 2)
    d.rectangle([x - 1, y - 1, x + tw + 1, y + th + 1], fill=PAPER)
    d.text((x, y), text, fill=INK, font=font(fs))
    return img
