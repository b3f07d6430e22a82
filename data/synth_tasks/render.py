"""Drawing helpers shared by the synthetic tasks (PIL only, deterministic)."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUND = (24, 24, 24)


def canvas(size: int, color=BACKGROUND) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def jitter(rng: random.Random, rgb, amount: int = 20):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
