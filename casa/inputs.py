"""What inference accepts as an image, and the error for what it cannot use.

Shared by the chat API (`casa.assistant`) and live captioning (`casa.captioning`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from casa.processing.image import ImageError, decode_image, to_rgb

ImageLike = Image.Image | str | Path | bytes


class InputError(ValueError):
    """An input image/frame/video that cannot be used (undecodable, wrong size)."""


def to_image(x: ImageLike | Any, max_pixels: int | None = None) -> Image.Image:
    """PIL image, path, encoded bytes or an HxWx3 uint8 array -> RGB PIL image (InputError otherwise)."""
    if isinstance(x, Image.Image):
        return to_rgb(x)
    try:
        if isinstance(x, (str, Path)):
            return decode_image(Path(x).read_bytes(), max_pixels)
        if isinstance(x, (bytes, bytearray)):
            return decode_image(bytes(x), max_pixels)
        if hasattr(x, "__array__"):
            import numpy as np

            return to_rgb(Image.fromarray(np.asarray(x)))
    except (OSError, ImageError, TypeError, ValueError) as e:
        raise InputError(f"cannot read image {str(x)[:80] if isinstance(x, (str, Path)) else type(x).__name__}: {e}") from None
    raise InputError(f"cannot use a {type(x).__name__} as an image (PIL image, path, bytes or HxWx3 array)")
