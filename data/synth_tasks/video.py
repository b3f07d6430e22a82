"""Video: moving-shape clips (QA about motion) and live captioning with frame-accurate events."""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.format import encode_image, text
from data.synth_tasks.render import COLORS, SHAPES, canvas, draw_shape

FPS = 2.0
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _frames(rng: random.Random, n: int):
    return [f"f{i:03d}" for i in range(n)], [round(i / FPS, 3) for i in range(n)]


def direction(rng: random.Random, size: int):
    n = int(rng.uniform(5, 12) * FPS)
    refs, times = _frames(rng, n)
    name = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[name]
    r = size * 0.18
    col, shp = COLORS[rng.choice(sorted(COLORS))], rng.choice(SHAPES)
    other = rng.uniform(r, size - r)
    files = {}
    for i, ref in enumerate(refs):
        u = r + (size - 2 * r) * i / max(n - 1, 1)  # from one side to the other
        along = u if (dx + dy) > 0 else size - u
        cx, cy = (along, other) if dx else (other, along)
        img = canvas(size)
        draw_shape(ImageDraw.Draw(img), shp, cx, cy, r, col)
        files[f"{ref}.jpg"] = encode_image(img, "jpg")
    conv = {"messages": [{"role": "user", "content": [{"type": "video"}, text("Which way does the shape move?")]},
                         {"role": "assistant", "content": [text(name)]}],
            "video": {"frames": refs, "timestamps": times, "layout": "qa"}}
    return conv, files


def live_caption(rng: random.Random, size: int):
    """A shape appears, may change colour, and disappears; each event is captioned at the
    frame it happens, nothing is said in between."""
    n = int(rng.uniform(5, 10) * FPS)
    refs, times = _frames(rng, n)
    appear = rng.randint(1, n // 3)
    vanish = rng.randint(2 * n // 3, n - 1)
    change = rng.randint(appear + 1, vanish - 1) if vanish - appear > 2 and rng.random() < 0.5 else None
    c1, c2 = rng.sample(sorted(COLORS), 2)
    shp = rng.choice(SHAPES)
    r = size * 0.25
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    captions = [{"t": times[appear], "text": f"a {c1} {shp} appears"}, {"t": times[vanish], "text": "it disappears"}]
    if change is not None:
        captions.insert(1, {"t": times[change], "text": f"it turns {c2}"})
    # the clip ends at one of its events, so the last (evaluated) caption is never "nothing happens"
    last = rng.choice([appear, vanish] + ([change] if change is not None else []))
    refs, times = refs[:last + 1], times[:last + 1]
    captions = [c for c in captions if c["t"] <= times[last]]
    files = {}
    for i, ref in enumerate(refs):
        img = canvas(size)
        if appear <= i < vanish:
            draw_shape(ImageDraw.Draw(img), shp, cx, cy, r, COLORS[c2 if change is not None and i >= change else c1])
        files[f"{ref}.jpg"] = encode_image(img, "jpg")
    conv = {"messages": [], "video": {"frames": refs, "timestamps": times, "captions": captions, "layout": "caption"}}
    return conv, files
