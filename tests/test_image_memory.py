"""Bounded memory for images (issue 26 item 4): casa leaves PIL's global decompression-bomb
guard alone, applies its own limit, and decodes a 16-bit 10000^2 PNG (200 MB stored; the
old float64 path peaked at 2.8 GB) within a stated bound.

The peak is the kernel's (VmHWM), reset just before the decode (`/proc/self/clear_refs`), so
it is measured in this process without the cost of a fresh interpreter importing torch."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import casa.assistant  # noqa: F401  everything that opens images is imported: none may touch PIL's guard
import data.converters  # noqa: F401
import data.dataset  # noqa: F401
from casa.processing.image import decode_image, patchify, smart_resize

PIL_DEFAULT_GUARD = 1024 * 1024 * 1024 // 4 // 3  # PIL's Image.MAX_IMAGE_PIXELS as shipped (89 MP)
BOUND_MB = 400
"""Peak RSS growth allowed for decoding the 16-bit 10000^2 PNG to the 448^2 cap: twice its
stored size (2 bytes a pixel, 200 MB): the decode holds the stored image once and nothing
else of full size (docs/reliability.md)."""


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def test_importing_casa_leaves_pil_guard_as_shipped():
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_GUARD, "importing casa changed PIL's global Image.MAX_IMAGE_PIXELS"


def test_sixteen_bit_10000_square_png_decodes_within_the_bound(tmp_path):
    a = np.zeros((10000, 10000), dtype=np.uint16)  # [H, W]
    a[::7, ::5] = 40000  # a sparse grid: the file stays small (~0.9 MB), the decode is full size
    Image.fromarray(a).save(tmp_path / "scan16.png", compress_level=1)
    del a
    png = (tmp_path / "scan16.png").read_bytes()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS counter here: {e}")
    before = _status_mb("VmRSS")
    with warnings.catch_warnings():  # 100 MP: PIL's own guard warns (as shipped), ours allows it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = decode_image(png, 448 * 448)
    pv, grid = patchify(img, 448 * 448)
    grown = _status_mb("VmHWM") - before
    assert grown < BOUND_MB, f"decoding grew peak RSS by {grown:.0f} MB (bound {BOUND_MB} MB)"
    h, w = smart_resize(10000, 10000, 56 * 56, 448 * 448)  # the target comes from the stored size
    assert grid == [1, h // 14, w // 14]
    assert max(img.size) < 2000  # reduced in its 16-bit mode, not converted at full size
    # the sparse grid's mean survives the box reduce: 1 pixel in 35 at 40000/65535*255
    assert abs(np.asarray(img, dtype=np.float32).mean() - 255 * 40000 / 65535 / 35) < 1.0
