"""Drawing helpers shared by the synthetic tasks (PIL only, deterministic).

Everything here is a pure function of its arguments: the tasks pass their own
`random.Random`, never the global RNG, so a sample is a function of (seed, split, task,
index) alone. PIL draws without anti-aliasing, which keeps colours exact: the tests
recover answers (colour, count, text) from the pixels.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from data.format import encode_image, image, text

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
"""Answer word -> RGB. Pairwise distances are >= 75, larger than the worst-case colour
jitter (`jitter` moves a colour by at most sqrt(3) * 20 ~ 35), so the nearest palette
colour of any drawn pixel is the answer."""
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUND = (24, 24, 24)
PAPER = (250, 250, 244)  # background of charts, tables and text
INK = (0, 0, 0)  # text colour: darker than every palette and distractor colour


def canvas(size: int, color=BACKGROUND) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline=None) -> None:
    """A shape of half-width `r` centred on (cx, cy); `fill=None` with an outline draws it hollow."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=outline)
    else:
        raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` px (FreeType, works offline); without FreeType the
    fixed ~11 px bitmap font, so text-size-dependent layouts must measure with `textsize`."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def textsize(s: str, size: int) -> tuple[int, int]:
    """(width, height) in pixels of `s` drawn at the origin with `font(size)`."""
    x0, y0, x1, y1 = font(size).getbbox(s)
    return x1, y1


def jitter(rng: random.Random, rgb, amount: int = 20) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def nearest_color(rgb) -> str:
    """The palette word closest (Euclidean RGB) to `rgb`."""
    return min(COLORS, key=lambda k: sum((a - b) ** 2 for a, b in zip(COLORS[k], rgb)))


def jpg(img: Image.Image) -> bytes:
    """JPEG bytes for video frames at quality 90: at `data.format.encode_image`'s default
    (75) the ringing around a 9 px shape on a 56 px frame reaches ~3 px, enough to smear
    the edge contact that the live-captioning events are defined by."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def single_image_qa(question: str, answer: str, img: Image.Image) -> tuple[dict, dict[str, bytes]]:
    """The one-turn layout of every image task: user [image, question] -> assistant answer."""
    conv = {"messages": [{"role": "user", "content": [image("img0"), text(question)]},
                         {"role": "assistant", "content": [text(answer)]}]}
    return conv, {"img0.png": encode_image(img)}
