"""Text reading (paper's OCR-like group): a short word rendered small among distractors.

The word sits at a random place on a small label, surrounded by hollow shapes and lines
in light colours. Reading it needs the exact glyph pixels (a ~size/10 px font), unlike the
coarse tasks whose answer survives heavy pooling.
"""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.synth_tasks.render import (COLORS, INK, PAPER, SHAPES, canvas, draw_shape, font, jitter, single_image_qa,
                                     textsize)

# no O/0, I/1, S/5 or Z/2: at 8-12 px these pairs are ambiguous even to a human reader
ALPHABET = "ABCDEFGHJKLMNPQRTUVWXY346789"
MIN_LEN, MAX_LEN = 3, 5
PAD = 1  # label margin around the glyphs (the distractors never touch the text)


def font_size(size: int) -> int:
    return max(8, size // 10)


def word(rng: random.Random, size: int):
    """A 3-5 character word among distractors -> "What text is written?" -> the word."""
    w = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
    img = canvas(size, PAPER)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 6)):  # light lines: distractors, never as dark as the ink
        d.line([(rng.randrange(size), rng.randrange(size)), (rng.randrange(size), rng.randrange(size))],
               fill=jitter(rng, (170, 170, 170), 30), width=1)
    for _ in range(rng.randint(2, 4)):
        r = rng.uniform(size * 0.04, size * 0.12)
        draw_shape(d, rng.choice(SHAPES), rng.uniform(0, size), rng.uniform(0, size), r, fill=None,
                   outline=jitter(rng, COLORS[rng.choice(sorted(COLORS))]))
    fs = font_size(size)
    tw, th = textsize(w, fs)
    if tw + 2 * PAD + 2 >= size:
        raise ValueError(f"ocr image_size={size} is too small for the word {w!r} at {fs} px "
                         f"(needs > {tw + 2 * PAD + 2})")
    x = rng.randint(PAD + 1, size - tw - PAD - 1)
    y = rng.randint(PAD + 1, size - th - PAD - 1)
    d.rectangle([x - PAD, y - PAD, x + tw + PAD, y + th + PAD], fill=PAPER)
    d.text((x, y), w, fill=INK, font=font(fs))
    return single_image_qa("What text is written?", w, img)
