"""Fine-grained reading (HRES-like): values printed small on charts and tables."""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.format import encode_image, image, text
from data.synth_tasks.render import COLORS, canvas, font

LABELS = "ABCD"


def _qa(question: str, answer: str, img):
    conv = {"messages": [{"role": "user", "content": [image("img0"), text(question)]},
                         {"role": "assistant", "content": [text(answer)]}]}
    return conv, {"img0.png": encode_image(img)}


def bar_value(rng: random.Random, size: int):
    """A bar chart with its values written small above the bars; the bars alone are too
    coarse to tell 23 from 26, so the answer needs the printed digits."""
    values = [rng.randint(10, 99) for _ in LABELS]
    img = canvas(size, (245, 245, 245))
    d = ImageDraw.Draw(img)
    f = font(max(8, size // 12))
    w = size / (len(LABELS) + 1)
    base = size - size // 8
    for i, (lab, v) in enumerate(zip(LABELS, values)):
        x0 = w * (i + 0.5)
        top = base - (base - size // 5) * v / 100
        d.rectangle([x0, top, x0 + w * 0.7, base], fill=COLORS[sorted(COLORS)[i]])
        d.text((x0, top - size // 10), str(v), fill=(0, 0, 0), font=f)
        d.text((x0 + w * 0.2, base + 1), lab, fill=(0, 0, 0), font=f)
    k = rng.randrange(len(LABELS))
    return _qa(f"What is the value of bar {LABELS[k]}?", str(values[k]), img)


def table_value(rng: random.Random, size: int):
    """A 2x2 table of small numbers; the question names a cell."""
    rows, cols = ("x", "y"), ("A", "B")
    values = {(r, c): rng.randint(0, 99) for r in rows for c in cols}
    img = canvas(size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    f = font(max(8, size // 10))
    cell = size / 3
    for j, c in enumerate(cols):
        d.text(((j + 1.3) * cell, 0.3 * cell), c, fill=(0, 0, 0), font=f)
    for i, r in enumerate(rows):
        d.text((0.3 * cell, (i + 1.3) * cell), r, fill=(0, 0, 0), font=f)
        for j, c in enumerate(cols):
            d.text(((j + 1.2) * cell, (i + 1.3) * cell), str(values[(r, c)]), fill=(0, 0, 0), font=f)
    for k in range(1, 3):
        d.line([(k * cell, 0), (k * cell, size)], fill=(120, 120, 120))
        d.line([(0, k * cell), (size, k * cell)], fill=(120, 120, 120))
    r, c = rng.choice(rows), rng.choice(cols)
    return _qa(f"What is in row {r}, column {c}?", str(values[(r, c)]), img)
