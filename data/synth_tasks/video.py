"""Video (paper's video group): moving-shape clips sampled at FPS frames per second.

Two kinds of sample:
- `direction` ("qa" layout): a shape crosses the frame; "Which way does the shape move?"
  -> left/right/up/down. One frame says nothing: the answer needs the frames in order.
- `live_caption` ("caption" layout): a shape enters from a side, may bounce off the
  opposite wall, and leaves. Each event is captioned at the timestamp of the frame that
  shows it, so `data.video` places the caption right after that frame and the model must
  stay silent on the frames in between (the paper's live video captioning, §4.2).

Frame-accurate events (the trajectory is built so that every frame is unambiguous):
    enter   first frame with the shape (partly) visible; the one before shows nothing
    bounce  the frame where the shape touches the far wall; the next one moves back
    leave   first frame where the shape is gone again; the clip ends on it, so the last
            (evaluated) assistant turn is never an empty one
"""

from __future__ import annotations

import random

from PIL import ImageDraw

from data.format import text
from data.synth_tasks.render import COLORS, SHAPES, canvas, draw_shape, jpg

FPS = 2.0
MIN_FRAMES, MAX_FRAMES = 10, 24  # 5-12 s at FPS
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SIDES = tuple(OPPOSITE)


def timeline(n: int) -> tuple[list[str], list[float]]:
    """Frame field names and their timestamps (seconds) for n frames at FPS."""
    return [f"f{i:03d}" for i in range(n)], [round(i / FPS, 3) for i in range(n)]


def _video(refs: list[str], times: list[float], frames: list, layout: str, messages: list, **extra):
    conv = {"messages": messages, "video": {"frames": refs, "timestamps": times, "layout": layout, **extra}}
    return conv, {f"{ref}.jpg": jpg(img) for ref, img in zip(refs, frames)}


def direction(rng: random.Random, size: int):
    """A shape moves steadily from one side to the other over the whole clip."""
    n = rng.randint(MIN_FRAMES, MAX_FRAMES)
    refs, times = timeline(n)
    name = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[name]
    r = size * 0.18
    color, shp = COLORS[rng.choice(sorted(COLORS))], rng.choice(SHAPES)
    other = rng.uniform(r, size - r)
    frames = []
    for i in range(n):
        u = r + (size - 2 * r) * i / (n - 1)  # distance travelled from the start side
        along = u if dx + dy > 0 else size - u
        img = canvas(size)
        draw_shape(ImageDraw.Draw(img), shp, *((along, other) if dx else (other, along)), r, color)
        frames.append(img)
    messages = [{"role": "user", "content": [{"type": "video"}, text("Which way does the shape move?")]},
                {"role": "assistant", "content": [text(name)]}]
    return _video(refs, times, frames, "qa", messages)


def trajectory(rng: random.Random, size: int, r: float, bounce: bool) -> tuple[list[float], int | None]:
    """Centre positions (px from the entry edge, one per frame from the entry frame to the
    leave frame inclusive) and the index of the bounce frame (None without bounce).

    The speed is chosen so the events fall on frames with a margin of >= 0.15 * speed px:
    entry frame shows `a * v` px of the shape, the frame before is `(1 - a) * v` px short.
        bounce:     v = size / (a + m)         -> frame m touches the far wall exactly
        no bounce:  v = (size + 2r) / (a + m - 0.5) -> frame m is 0.5 v past the far edge
    """
    m = rng.randint(3, 5)  # frames from entry to the far wall
    a = rng.uniform(0.25, 0.85)
    if bounce:
        v = size / (a + m)
        out = [-r + (a + j) * v for j in range(m + 1)]            # in, up to the wall
        out += [size - r - j * v for j in range(1, m + 2)]        # back, until gone
        return out, m
    v = (size + 2 * r) / (a + m - 0.5)
    return [-r + (a + j) * v for j in range(m + 1)], None


def live_caption(rng: random.Random, size: int):
    """Enter / (bounce) / leave events captioned at their frames (see module doc)."""
    color, shp, side = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice(SIDES)
    r = size * 0.16
    path, bounce_at = trajectory(rng, size, r, bounce=rng.random() < 0.5)
    n = max(rng.randint(MIN_FRAMES, MAX_FRAMES), len(path) + 1)  # >= 1 empty frame before the entry
    first = n - len(path)  # the leave frame (last of `path`) is the last frame of the clip
    refs, times = timeline(n)
    cross = rng.uniform(r + 2, size - r - 2)  # clear of the side walls: only the motion axis touches edges
    frames = []
    for i in range(n):
        img = canvas(size)
        if first <= i < n - 1:
            c = path[i - first]
            # entry-edge coordinate -> image (x, y)
            xy = {"left": (c, cross), "right": (size - c, cross), "top": (cross, c), "bottom": (cross, size - c)}[side]
            draw_shape(ImageDraw.Draw(img), shp, *xy, r, COLORS[color])
        frames.append(img)
    exit_side = side if bounce_at is not None else OPPOSITE[side]
    captions = [{"t": times[first], "text": f"the {color} {shp} enters from the {side}"}]
    if bounce_at is not None:
        captions.append({"t": times[first + bounce_at], "text": "it bounces"})
    captions.append({"t": times[n - 1], "text": f"it leaves on the {exit_side}"})
    return _video(refs, times, frames, "caption", [], captions=captions)
