"""Images: unusual modes -> RGB, huge images downscaled, corrupt bytes, patchify vs transformers."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from casa.processing.image import ImageError, decode_image, num_image_tokens, patchify, smart_resize
from tests.data_fixtures import jpeg_bytes


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_cmyk_becomes_rgb_with_the_right_colour():
    data = _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (40, 30)
    r, g, b = np.asarray(out)[15, 20].tolist()
    assert r > 200 and g < 60 and b < 60


def test_transparent_modes_are_composited_on_white():
    la = Image.new("LA", (8, 8), (0, 0))  # black but fully transparent
    assert np.asarray(decode_image(_encode(la, "PNG"))).min() == 255
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    assert np.asarray(decode_image(_encode(rgba, "PNG")))[0, 0].tolist() == [255, 0, 0]
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.asarray(decode_image(_encode(p, "PNG")))[0, 0].tolist() == [10, 20, 30]
    p.info["transparency"] = 1
    assert np.asarray(decode_image(_encode(p, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16)[None].repeat(4, 0)  # [4, 64]
    out = np.asarray(decode_image(_encode(Image.fromarray(ramp), "PNG")))
    assert out.shape == (4, 64, 3)
    np.testing.assert_allclose(out[0, :, 0], np.rint(ramp[0] / 65535 * 255), atol=1)
    assert (out[0, :, 0] < 255).sum() > 60  # clipping would saturate almost everything


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 100 MP: PIL warns, ours allows
def test_huge_image_is_downscaled_under_the_cap_at_reduced_scale():
    """What makes it fast is checked, not a wall time (which a loaded machine breaks): the
    decoder never builds the 10000^2 image."""
    big = Image.new("RGB", (10000, 10000), (10, 200, 10))
    for data in (jpeg_bytes(big, quality=50), _encode(big, "PNG")):
        img = decode_image(data, 448 * 448)
        pv, grid = patchify(img, 448 * 448)
        # the reduced decode must not change the target: Qwen's rule on the stored size
        h, w = smart_resize(10000, 10000, 56 * 56, 448 * 448)
        assert grid == [1, h // 14, w // 14] and h * w <= 448 * 448
        assert max(img.size) < 2000  # decoded at reduced scale (draft / reduce), not at 10000^2
        assert pv.shape == (h * w // 196, 1176)
        mean = np.asarray(img).reshape(-1, 3).mean(0)
        assert abs(mean[1] - 200) < 3 and abs(mean[0] - 10) < 3


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, b"GIF89a" + b"\x00" * 20])
def test_corrupt_bytes_raise_image_error(data):
    with pytest.raises(ImageError):
        decode_image(data)


def test_truncated_jpeg_raises_image_error():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    data = jpeg_bytes(img)
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 3])


@pytest.mark.parametrize("size,max_pixels,min_pixels", [((130, 90), 112 * 112, 56 * 56), ((300, 41), 224 * 224, 56 * 56),
                                                        ((20, 30), 224 * 224, 56 * 56), ((644, 476), 448 * 448, 56 * 56)])
def test_patchify_equals_qwen2vl_image_processor(size, max_pixels, min_pixels):
    # the PIL backend, named: `Qwen2VLImageProcessor` resolves to the torchvision one when torchvision
    # is installed, whose bicubic resize is not PIL's; our pixels are PIL's (casa.processing.image)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=[img], return_tensors="pt")
    pv, grid = patchify(img, max_pixels, min_pixels)
    assert grid == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(pv, ref["pixel_values"].float())
    assert num_image_tokens(*size, max_pixels, min_pixels) == pv.shape[0] // 4


def test_smart_resize_keeps_multiples_of_28_and_the_cap():
    for h, w in [(10000, 10000), (1080, 1920), (57, 3000), (28, 28)]:
        rh, rw = smart_resize(h, w, 56 * 56, 896 * 896)
        assert rh % 28 == 0 and rw % 28 == 0 and 56 * 56 <= rh * rw <= 896 * 896
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(10, 5000)


# ---------------------------------------------------------------------------------- every mode, bounded
def _reference_to_rgb(img: Image.Image) -> Image.Image:
    """The conversion as it was before the bounded decode (float64, whole image): the reference
    the new path must reproduce on images small enough not to be reduced."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16") or 255.0 < top <= 65535.0:
            hi = 65535.0
        elif img.mode == "F" and top <= 1.0:
            hi = 1.0
        else:
            hi = max(top, 255.0)
        arr = np.clip(np.rint(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _mode_image(mode: str, w: int, h: int) -> tuple[Image.Image, str]:
    """A smooth, non-constant image of `mode` (gradients plus a little noise) and the format
    that stores it losslessly."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    ramp = (x / max(w - 1, 1) + y / max(h - 1, 1)) / 2  # [H, W] in [0, 1]
    noisy = np.clip(ramp + rng.normal(0, 0.02, ramp.shape), 0, 1)
    if mode == "I;16":
        return Image.fromarray((noisy * 60000).astype(np.uint16)), "PNG"
    if mode == "I":
        return Image.fromarray((noisy * 3000).astype(np.int32), mode="I"), "TIFF"
    if mode == "F":
        return Image.fromarray((noisy * 0.9).astype(np.float32), mode="F"), "TIFF"
    rgba = np.stack([noisy * 255, ramp[::-1] * 255, np.full_like(ramp, 90), 255 - noisy * 200], -1).astype(np.uint8)
    img = Image.fromarray(rgba, mode="RGBA")
    if mode == "P":
        return img.convert("RGB").quantize(64), "PNG"
    if mode == "P+transparency":
        p = img.convert("RGB").quantize(64)
        p.info["transparency"] = 3
        return p, "PNG"
    if mode == "1":
        return img.convert("L").convert("1"), "PNG"
    return img.convert(mode), {"CMYK": "TIFF", "YCbCr": "TIFF"}.get(mode, "PNG")


MODES = ["L", "LA", "RGB", "RGBA", "CMYK", "P", "P+transparency", "1", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_old_pixels_on_a_normal_image(mode):
    img, fmt = _mode_image(mode, 90, 70)
    data = _encode(img, fmt)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == mode.split("+")[0] or (mode == "I" and stored.mode.startswith("I")), stored.mode
    new = np.asarray(decode_image(data, 448 * 448)).astype(int)
    old = np.asarray(_reference_to_rgb(stored)).astype(int)
    if mode == "F":  # float32 vs float64 may round a value sitting on .5 the other way
        assert np.abs(new - old).max() <= 1 and (new == old).mean() > 0.999
    else:
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_reduced_before_conversion_with_the_same_picture(mode):
    """A 960x720 image to a 56^2 cap: decoded at reduced scale in every mode (the old code
    converted I;16, I, F, P and 1 at full size), the patches close to the full-size path."""
    img, fmt = _mode_image(mode, 960, 720)
    data = _encode(img, fmt)
    small = decode_image(data, 56 * 56)
    assert max(small.size) <= 960 // 7 + 1, small.size  # reduced 7x (2x the final size kept), not 960 x 720
    pv, grid = patchify(small, 56 * 56)
    ref = _reference_to_rgb(Image.open(io.BytesIO(data)))  # full size, then the exact resize
    ref.info["casa_original_size"] = ref.size
    ref_pv, ref_grid = patchify(ref, 56 * 56)
    assert grid == ref_grid
    # the box reduce before the bicubic resize smooths the noise a little: means agree, pixels closely
    assert (pv - ref_pv).abs().mean() < 0.05, (pv - ref_pv).abs().mean()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height: the header is all a size check may read."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_above_our_limit_is_refused_from_the_header_naming_size_and_limit():
    from casa.processing.image import MAX_DECODE_PIXELS, ImageTooLarge

    side = int(MAX_DECODE_PIXELS ** 0.5) + 1  # below PIL's error threshold: ours speaks first
    with pytest.raises(ImageTooLarge, match=rf"{side}x{side} = {side * side} pixels exceeds the decode limit "
                                            rf"of {MAX_DECODE_PIXELS} pixels"):
        decode_image(_png_header(side, side), 448 * 448)
    with pytest.raises(ImageTooLarge, match="exceeds the decode limit of 100 pixels"):
        decode_image(_encode(Image.new("RGB", (11, 10)), "PNG"), limit=100)
    with pytest.raises(ImageTooLarge, match="could be decompression bomb"):  # PIL's own guard, kept
        decode_image(_png_header(20000, 20000), limit=20000 * 20000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_dataset_counts_a_too_large_image_naming_the_sample_and_the_image():
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from data.dataset import SampleProcessor, SkipSample
    from tests.data_fixtures import conv, raw

    proc = SampleProcessor(ChatTemplate("helium", resolve_tokenizer("char")), max_pixels=56 * 56)
    with pytest.raises(SkipSample) as e:
        proc(raw("big", conv(), {"img0.png": _png_header(13000, 12000)}))
    assert e.value.reason == "image_too_large"
    assert "big: image 'img0': 13000x12000 = 156000000 pixels exceeds the decode limit" in str(e.value)
