"""Images: bytes -> RGB -> resized under a pixel cap -> Qwen2.5-VL patches.

    decode_image(bytes)            any PIL-readable format; CMYK, LA, P, RGBA, I;16 ... -> RGB
    resize_for_vision(img, cap)    keep the aspect ratio, both sides multiples of 28 (14 px
                                   patches x 2x2 merge), h*w <= max_pixels (paper: 896^2
                                   for images, 448^2 for video frames)
    patchify(img)                  -> pixel_values [P, 3*2*14*14], grid_thw (1, h/14, w/14),
                                   identical to transformers' Qwen2VLImageProcessor

An image yields P/4 tokens after the vision encoder's merge. Corrupt bytes raise
`ImageError`, which the dataset counts as a skipped sample.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_DECODE_PIXELS = 20000 * 20000
"""Beyond this a file is treated as a decompression bomb (PIL's own guard is lower and would
reject a legitimate 10000 x 10000 scan)."""
Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS  # our own check in decode_image replaces PIL's


class ImageError(ValueError):
    """Undecodable, truncated or absurd image bytes."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit greyscale is rescaled to 8 bits (not clipped);
    transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        # 16-bit PNGs open as "I;16" or "I": scale by the bit depth the values imply
        hi = 65535.0 if img.mode.startswith("I;16") or 255.0 < top <= 65535.0 else (255.0 if top <= 255.0 else top)
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, L, P, YCbCr, 1 ...


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """Qwen2-VL's rule: sides multiples of `factor`, pixels within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if max(height, width) / max(min(height, width), 1) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """bytes -> RGB image. With `max_pixels`, JPEGs are decoded at reduced scale when they
    are far above the cap (PIL's draft mode), which makes huge scans cheap."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_DECODE_PIXELS:
            raise ImageError(f"{img.width}x{img.height} exceeds the decode limit")
        if max_pixels and img.format == "JPEG" and img.width * img.height > 4 * max_pixels:
            scale = math.sqrt(img.width * img.height / max_pixels)
            img.draft("RGB", (int(img.width / scale * 1.5), int(img.height / scale * 1.5)))
        img.load()
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError ...)
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from e
    return to_rgb(img)


def resize_for_vision(img: Image.Image, max_pixels: int, min_pixels: int = 56 * 56) -> Image.Image:
    h, w = smart_resize(img.height, img.width, min_pixels, max_pixels)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), resample=Image.BICUBIC)


def patchify(img: Image.Image, max_pixels: int = 896 * 896, min_pixels: int = 56 * 56) -> tuple[torch.Tensor, list[int]]:
    """RGB image -> (pixel_values [P, 3*2*14*14] float32, grid_thw [1, h/14, w/14])."""
    img = resize_for_vision(img, max_pixels, min_pixels)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0  # [3, H, W]
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    C, H, W = x.shape
    gh, gw = H // PATCH, W // PATCH
    x = x.reshape(C, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/2, gw/2, 2, 2, C, 14, 14]: merge groups stay contiguous
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], TEMPORAL, PATCH, PATCH)  # a still image = 2 equal frames
    return x.reshape(gh * gw, C * TEMPORAL * PATCH * PATCH).contiguous(), [1, gh, gw]


def num_image_tokens(width: int, height: int, max_pixels: int, min_pixels: int = 56 * 56) -> int:
    h, w = smart_resize(height, width, min_pixels, max_pixels)
    return (h // PATCH) * (w // PATCH) // (MERGE * MERGE)
