"""Text reading (OCR-like): a short word rendered small among distractor strokes."""

from __future__ import annotations

import random
import string

from PIL import ImageDraw

from data.format import encode_image, image, text
from data.synth_tasks.render import canvas, font, jitter


def word(rng: random.Random, size: int):
    w = "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(rng.randint(3, 5)))
    img = canvas(size, (250, 250, 240))
    d = ImageDraw.Draw(img)
    for _ in range(6):  # distractor lines
        d.line([(rng.uniform(0, size), rng.uniform(0, size)), (rng.uniform(0, size), rng.uniform(0, size))],
               fill=jitter(rng, (160, 160, 160), 40), width=1)
    f = font(max(8, size // 9))
    d.text((rng.uniform(2, size * 0.45), rng.uniform(2, size * 0.8)), w, fill=(10, 10, 10), font=f)
    conv = {"messages": [{"role": "user", "content": [image("img0"), text("What text is written?")]},
                         {"role": "assistant", "content": [text(w)]}]}
    return conv, {"img0.png": encode_image(img)}
