"""Images: bytes -> RGB -> resized under a pixel cap -> Qwen2.5-VL patches.

    decode_image(bytes, max_pixels)   any PIL-readable format; CMYK, LA, P, RGBA, I;16 ... -> RGB.
                                      Files above MAX_DECODE_PIXELS raise ImageTooLarge; huge
                                      ones are decoded at reduced scale (JPEG draft, a box
                                      reduce in the stored mode otherwise) before conversion
                                      and the exact resize.
    resize_for_vision(img, cap)       keep the aspect ratio, both sides multiples of 28 (14 px
                                      patches x 2x2 merge), h*w <= max_pixels (paper: 896^2
                                      for images, 448^2 for video frames)
    patchify(img, max_pixels)         -> pixel_values [P, 3*2*14*14], grid_thw (1, h/14, w/14),
                                      identical to transformers' Qwen2VLImageProcessor
    patchify_many(imgs, max_pixels)   the same for a list; same-size images (a video's frames)
                                      as one tensor op

An image yields P/4 tokens after the vision encoder's 2x2 merge. Undecodable, truncated or
absurd bytes raise `ImageError`, which the dataset counts as a skipped `corrupt_image`
(`image_too_large` for `ImageTooLarge`).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

try:  # the reference rule; the PIL module imports without torchvision
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as _hf_smart_resize
except ImportError:  # pragma: no cover - older/newer transformers layouts
    _hf_smart_resize = None

PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_DECODE_PIXELS = 12000 * 12000
"""Our own limit on a stored image (144 MP), checked from the header before any pixel is
decoded: a larger file raises `ImageTooLarge` (the dataset counts it as `image_too_large`).
PIL's global guard (`Image.MAX_IMAGE_PIXELS`: a warning above 89 MP, `DecompressionBombError`
above twice that) is left as it is; its error is reported the same way. Memory: a PNG/TIFF is
decoded whole in its stored mode (at most 4 bytes a pixel, 576 MB at the limit), then reduced
in that mode or in strips (`reduce_bounded`); nothing of full size is built beyond it (a 16-bit
10000^2 PNG: 200 MB stored, peak RSS growth under 400 MB, tests/test_image_memory.py)."""

STRIP_PIXELS = 1 << 20
"""Pixels converted at a time where a mode must be converted at full size (P, 1, I;16 before a
reduce; I/F/I;16 -> 8 bits): the temporary is a strip (<= 4 MB as float32), not the image."""

BATCH_PIXELS = 1 << 18
"""`patchify_many` batches same-size images up to this many pixels (80 frames of 56², one of
448²): small frames gain from one op, large ones lose once the batch leaves the CPU cache
(measured: 0.05 vs 0.1 ms per 56² frame batched vs alone, 5.4 vs 4.4 ms per 448² frame)."""
ORIGINAL_SIZE = "casa_original_size"
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
    """Undecodable, truncated or absurd image bytes (counted as `corrupt_image`)."""


class ImageTooLarge(ImageError):
    """A stored image above the decode limit (counted as `image_too_large`): names its size
    and the limit."""


def value_top(img: Image.Image) -> float:
    """The value an I;16 / I / F image's white maps to (see `to_rgb`), from its stored
    extrema (PIL computes them without a copy), so a reduced copy scales as its original."""
    if img.mode in _SIXTEEN_BIT:
        return 65535.0  # 16-bit PNGs open as "I;16" (new Pillow) or "I" (older Pillow)
    _, top = img.getextrema() if img.width and img.height else (0.0, 0.0)
    top = float(top)
    if 255.0 < top <= 65535.0:
        return 65535.0
    if img.mode == "F" and top <= 1.0:
        return 1.0  # float images in [0, 1]
    return max(top, 255.0)


def _to_eight_bits(img: Image.Image, hi: float) -> Image.Image:
    """I;16 / I / F image -> L, x / hi * 255 rounded, a strip of rows at a time in float32
    (a float64 copy of a 100 MP scan would be 800 MB; a strip is at most 4 MB)."""
    out = np.empty((img.height, img.width), dtype=np.uint8)  # [H, W]
    rows = max(1, STRIP_PIXELS // max(img.width, 1))
    for top in range(0, img.height, rows):
        strip = np.asarray(img.crop((0, top, img.width, min(img.height, top + rows))), dtype=np.float32)
        out[top:top + strip.shape[0]] = np.clip(np.rint(strip / np.float32(hi) * np.float32(255.0)), 0, 255)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image, hi: float | None = None) -> Image.Image:
    """Any PIL mode -> RGB.

    16-bit greyscale is rescaled to 8 bits (x / 65535 * 255, not clipped at 255, which would
    turn almost every pixel white); 32-bit "I"/"F" images are rescaled from the range their
    values imply (`value_top`; `hi` overrides it: a reduced copy keeps its original's scale).
    Transparency is composited on white (a transparent PNG's hidden RGB is often black or
    garbage)."""
    if img.mode == "RGB":
        return img
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        return _to_eight_bits(img, hi if hi is not None else value_top(img)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, L, P, YCbCr, 1 ...


def _reduce_via(img: Image.Image) -> str | None:
    """The mode a stored mode is converted to before a box reduce (None: reduce it as it is).
    Palette indices and 1-bit pixels cannot be averaged, and PIL's `reduce` refuses I;16."""
    if img.mode in _SIXTEEN_BIT:
        return "I"  # the same integers, 32 bits: the scale (`value_top`) is unchanged
    if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        return "RGBA"
    return {"P": "RGB", "1": "L"}.get(img.mode)


def reduce_bounded(img: Image.Image, factor: int) -> Image.Image:
    """`img.reduce(factor)` (box filter) for every mode, never converting the whole image:
    a mode that must be converted first (`_reduce_via`) is converted and reduced a strip of
    rows at a time (strip heights are multiples of `factor`, so the boxes are the same ones)."""
    if factor <= 1:
        return img
    via = _reduce_via(img)
    if via is None:
        return img.reduce(factor)
    w, h = img.size
    out = Image.new(via, (-(-w // factor), -(-h // factor)))
    rows = factor * max(1, STRIP_PIXELS // (w * factor))
    for top in range(0, h, rows):
        strip = img.crop((0, top, w, min(h, top + rows))).convert(via).reduce(factor)
        out.paste(strip, (0, top // factor))
    return out


def smart_resize(height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = 896 * 896,
                 factor: int = FACTOR) -> tuple[int, int]:
    """Qwen2-VL's rule (transformers' `smart_resize` when importable): sides multiples of
    `factor`, pixels within [min_pixels, max_pixels], aspect ratio kept as closely as possible.
    Raises ImageError for aspect ratios above 200 (Qwen's limit)."""
    if min(height, width) < 1:
        raise ImageError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    if _hf_smart_resize is not None:
        return _hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    h_bar = round(height / factor) * factor  # same arithmetic as transformers
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, max_pixels: int | None = None, limit: int = MAX_DECODE_PIXELS) -> Image.Image:
    """bytes -> RGB image.

    A stored size above `limit` pixels raises `ImageTooLarge` before any decoding. With
    `max_pixels`, an image far above the cap is decoded at reduced scale first: JPEGs through
    PIL's draft mode (the DCT skips the detail, 10000^2 decodes in ~0.1 s), every other format
    and mode with a box reduce in its stored mode (`reduce_bounded`), before any conversion.
    Both keep at least 2x the final resolution so the exact bicubic resize that follows still
    sets the output quality."""
    try:
        img = Image.open(io.BytesIO(data))
        original = img.size
        if img.width * img.height > limit:
            raise ImageTooLarge(f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds the decode "
                                f"limit of {limit} pixels")
        over = img.width * img.height / max_pixels if max_pixels else 0.0
        if over > 16 and img.format == "JPEG":
            scale = math.sqrt(over)
            img.draft(img.mode, (int(img.width / scale * 2), int(img.height / scale * 2)))
        img.load()
        hi = value_top(img) if img.mode in (*_SIXTEEN_BIT, "I", "F") else None
        over = img.width * img.height / max_pixels if max_pixels else 0.0
        if over > 16:
            img = reduce_bounded(img, int(math.sqrt(over) / 2))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard, above twice Image.MAX_IMAGE_PIXELS
        raise ImageTooLarge(f"{e}") from None
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError ...)
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from e
    try:
        out = to_rgb(img, hi)
    except Exception as e:  # exotic modes PIL cannot convert (LAB, HSV ...)
        raise ImageError(f"cannot convert mode {img.mode!r} to RGB: {e}") from e
    # the target size is computed from the stored size, so a reduced decode does not change
    # the image's token count (draft/reduce sizes are not exact fractions)
    out.info[ORIGINAL_SIZE] = original
    return out


def resize_for_vision(img: Image.Image, max_pixels: int, min_pixels: int = MIN_PIXELS) -> Image.Image:
    """-> the image at Qwen's target size, computed from its size on disk (see decode_image)."""
    width, height = img.info.get(ORIGINAL_SIZE, img.size)
    h, w = smart_resize(height, width, min_pixels, max_pixels)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), resample=Image.BICUBIC)  # Qwen2VLImageProcessor's resample


def patchify(img: Image.Image, max_pixels: int = 896 * 896, min_pixels: int = MIN_PIXELS) -> tuple[torch.Tensor, list[int]]:
    """RGB image -> (pixel_values [P, 3*2*14*14] float32, grid_thw [1, h/14, w/14]); P = h*w/14^2.

    Rows are ordered so that each 2x2 merge group is contiguous (Qwen's layout), and a still
    image is its own second temporal frame (Qwen repeats it to fill temporal_patch_size=2)."""
    return patchify_many([img], max_pixels, min_pixels)[0]


def patchify_many(imgs: list[Image.Image], max_pixels: int = 896 * 896,
                  min_pixels: int = MIN_PIXELS) -> list[tuple[torch.Tensor, list[int]]]:
    """[patchify(img) for img in imgs], with the images of one target size (a video's frames)
    normalised and rearranged as ONE tensor op: the per-image cost is the fixed overhead of
    a dozen small torch calls, not the arithmetic, for small frames. Outputs are views of the
    group's tensor, each contiguous [P, 3*2*14*14], in the order of `imgs`. An ImageError
    carries `.index`, the position of the image it is about."""
    ready = []
    for i, img in enumerate(imgs):
        if img.mode != "RGB":
            info = dict(img.info)
            img = to_rgb(img)
            img.info.update({k: v for k, v in info.items() if k == ORIGINAL_SIZE})
        try:
            ready.append(resize_for_vision(img, max_pixels, min_pixels))
        except ImageError as e:
            e.index = i  # which image: callers name it
            raise
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(ready):
        groups.setdefault((img.height, img.width), []).append(i)
    out: list = [None] * len(ready)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    chunks = []  # (size, indices) with at most BATCH_PIXELS pixels each (at least one image)
    for (H, W), idx in groups.items():
        per = max(1, BATCH_PIXELS // (H * W))
        chunks += [((H, W), idx[k:k + per]) for k in range(0, len(idx), per)]
    for (H, W), idx in chunks:
        x = torch.from_numpy(np.stack([np.asarray(ready[i]) for i in idx]))  # [N, H, W, C] uint8
        N, C = x.shape[0], x.shape[3]
        gh, gw = H // PATCH, W // PATCH
        # rearranged while still uint8 (a quarter of the bytes), then normalised in place: the
        # same float ops on the same values as pixels-first, so bit-identical
        x = x.reshape(N, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH, C)
        x = x.permute(0, 1, 4, 2, 5, 7, 3, 6).to(torch.float32)  # [N, gh/2, gw/2, 2, 2, C, 14, 14]
        x.div_(255.0).sub_(mean).div_(std)
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], TEMPORAL, PATCH, PATCH)  # [..., C, 2, 14, 14]
        x = x.reshape(N, gh * gw, PATCH_DIM)  # [N, P, C*2*14*14], a copy: contiguous
        for k, i in enumerate(idx):
            out[i] = (x[k], [1, gh, gw])
    return out


def num_image_tokens(width: int, height: int, max_pixels: int, min_pixels: int = MIN_PIXELS) -> int:
    """Tokens of a width x height image after resize, patchify and the 2x2 merge (= P/4)."""
    h, w = smart_resize(height, width, min_pixels, max_pixels)
    return (h // PATCH) * (w // PATCH) // (MERGE * MERGE)
