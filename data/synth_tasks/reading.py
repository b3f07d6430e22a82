"""Fine-grained reading (paper's HRES-like group): values printed small on charts and tables.

The answer is a two-digit number printed in a ~size/12 px font. The bar heights alone are
too coarse to tell 23 from 26, and at 112x112 the digits span a few pixels of one 28x28
visual token, so the answer needs fine detail: this is where token insertion's full-rate
visual tokens should beat compressed fusion (Q-Former) and where CASA has to close the gap.
"""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.synth_tasks.render import COLORS, INK, PAPER, canvas, font, single_image_qa, textsize

BAR_LABELS = "ABCD"
ROW_LABELS = ("x", "y", "z")
COL_LABELS = ("A", "B", "C")
MIN_VALUE, MAX_VALUE = 10, 99  # always two digits: the answer length does not leak the value


def font_size(size: int) -> int:
    return max(8, size // 12)


def bar_geometry(size: int, n: int = len(BAR_LABELS)) -> dict:
    """Pixel layout of the bar chart (pure; the tests re-derive bar heights from it):
    `slot` px per bar, `base` the y of the axis, `top` the y a MAX_VALUE bar reaches."""
    fs = font_size(size)
    th = textsize("0", fs)[1]
    base = size - th - 3  # the label row sits under the axis
    top = th + 4          # the value of the tallest bar still fits above it
    return {"fs": fs, "slot": size / n, "base": base, "top": top}


def bar_height(value: int, g: dict) -> int:
    return round((g["base"] - g["top"]) * value / MAX_VALUE)


def bar_value(rng: random.Random, size: int):
    """A 4-bar chart, each value printed above its bar -> "What is the value of B?" -> "42"."""
    values = [rng.randint(MIN_VALUE, MAX_VALUE) for _ in BAR_LABELS]
    g = bar_geometry(size)
    img = canvas(size, PAPER)
    d = ImageDraw.Draw(img)
    f = font(g["fs"])
    colors = rng.sample(sorted(COLORS), len(BAR_LABELS))
    for i, (label, v) in enumerate(zip(BAR_LABELS, values)):
        x0, x1 = round(g["slot"] * (i + 0.15)), round(g["slot"] * (i + 0.85))
        y_top = g["base"] - bar_height(v, g)
        d.rectangle([x0, y_top, x1, g["base"]], fill=COLORS[colors[i]])
        w, h = textsize(str(v), g["fs"])
        d.text(((x0 + x1 - w) // 2, y_top - h - 1), str(v), fill=INK, font=f)
        lw, _ = textsize(label, g["fs"])
        d.text(((x0 + x1 - lw) // 2, g["base"] + 2), label, fill=INK, font=f)
    k = rng.randrange(len(BAR_LABELS))
    return single_image_qa(f"What is the value of {BAR_LABELS[k]}?", str(values[k]), img)


def table_value(rng: random.Random, size: int):
    """A 3x3 table of two-digit numbers with row (x, y, z) and column (A, B, C) headers ->
    "What is in row y, column C?" -> "57"."""
    values = {(r, c): rng.randint(MIN_VALUE, MAX_VALUE) for r in ROW_LABELS for c in COL_LABELS}
    img = canvas(size, PAPER)
    d = ImageDraw.Draw(img)
    fs = font_size(size)
    f = font(fs)
    cell = size / (len(COL_LABELS) + 1)

    def put(s: str, col: int, row: int) -> None:  # text centred in cell (col, row); row/col 0 = headers
        w, h = textsize(s, fs)
        d.text((round((col + 0.5) * cell) - w // 2, round((row + 0.5) * cell) - h // 2), s, fill=INK, font=f)

    for j, c in enumerate(COL_LABELS):
        put(c, j + 1, 0)
    for i, r in enumerate(ROW_LABELS):
        put(r, 0, i + 1)
        for j, c in enumerate(COL_LABELS):
            put(str(values[(r, c)]), j + 1, i + 1)
    grid = (150, 150, 150)  # lighter than the ink, so digits stay separable from the rules
    for k in range(1, len(COL_LABELS) + 1):
        d.line([(round(k * cell), 0), (round(k * cell), size)], fill=grid)
        d.line([(0, round(k * cell)), (size, round(k * cell))], fill=grid)
    r, c = rng.choice(ROW_LABELS), rng.choice(COL_LABELS)
    return single_image_qa(f"What is in row {r}, column {c}?", str(values[(r, c)]), img)
