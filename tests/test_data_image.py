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
