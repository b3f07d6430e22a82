"""Tiny shards for the data tests, written with `data.format` (no generator needed)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from casa.processing.sample import Sample
from data.format import ShardWriter, encode_image, image, make_sample, text


def png(size=(56, 56), color=(200, 30, 30)) -> bytes:
    return encode_image(Image.new("RGB", size, color))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def conv(question="What colour?", answer="red", refs=("img0",), task="t", group="g") -> dict:
    return {"messages": [{"role": "user", "content": [*(image(r) for r in refs), text(question)]},
                         {"role": "assistant", "content": [text(answer)]}], "task": task, "group": group}


def good_samples(n: int, prefix: str = "s", answer_len: int = 1) -> list[dict]:
    return [make_sample(f"{prefix}{i:03d}", conv(answer=f"{i}" * answer_len), {"img0.png": png()}) for i in range(n)]


def raw(key: str, conversation: dict | bytes, files: dict[str, bytes]) -> dict:
    """A sample written WITHOUT the writer-side check (to produce bad input on purpose)."""
    js = conversation if isinstance(conversation, bytes) else json.dumps(conversation).encode()
    return {"__key__": key, "json": js, **files}


def write(out: Path, name: str, samples: list[dict], max_count: int = 1000) -> list[str]:
    with ShardWriter(out, name, max_count=max_count) as w:
        for s in samples:
            w.write(s)
    return w.shards


def sample(n_text: int, image_tokens: list[int] = (), positions: list[int] | None = None, key: str = "") -> Sample:
    """A packing Sample: n_text tokens, one image of `k` tokens (grid 1 x 2 x 2k) per entry."""
    positions = list(positions) if positions is not None else [0] * len(image_tokens)
    grids = [[1, 2, 2 * k] for k in image_tokens]
    pixels = [torch.zeros(4 * k, 3 * 2 * 14 * 14) for k in image_tokens]
    ids = list(range(1, n_text + 1))
    return Sample(ids, [False] * n_text, positions, pixels, grids, {"key": key or f"n{n_text}"})


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """tar -> {key: {field: bytes}} (the webdataset grouping: key = name up to the first dot)."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, field = m.name.split(".", 1)
            samples[key][field] = tf.extractfile(m).read()
    return dict(samples)


# ---------------------------------------------------------------------------------- encoded video
# Clips encoded by the tests themselves with PyAV. Each frame carries its index as 8 vertical
# stripes (bit k set = white stripe k), wide enough to survive h264/vp9 at any quality.
CODE_BITS = 8


def counter_frame(index: int, size=(64, 64)) -> "numpy.ndarray":  # noqa: F821
    """HxWx3 uint8: the frame index as stripes over the top half, mid-grey below."""
    import numpy as np

    w, h = size
    a = np.full((h, w, 3), 128, np.uint8)
    stripe = w // CODE_BITS
    for k in range(CODE_BITS):
        a[: h // 2, k * stripe:(k + 1) * stripe] = 255 if (index >> k) & 1 else 0
    return a


def read_counter(image: Image.Image) -> int:
    """The index `counter_frame` drew, read back from a decoded frame (stripe centres)."""
    import numpy as np

    a = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = a.shape
    stripe = w // CODE_BITS
    bits = [a[h // 8: 3 * h // 8, k * stripe + stripe // 4:(k + 1) * stripe - stripe // 4].mean() > 128
            for k in range(CODE_BITS)]
    return sum(1 << k for k, b in enumerate(bits) if b)


def encode_clip(path: Path, times: list[float], codec: str = "libx264", size=(64, 64), gop: int = 12,
                rotation: int | None = None, frame=counter_frame, audio: bool = False) -> Path:
    """Encode one frame per timestamp (seconds, ms precision: VFR is just uneven times) with
    `frame(index, size)` as the picture; `rotation`: a display matrix (counter-clockwise)."""
    from fractions import Fraction

    import av

    ms = Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=round(len(times) / max(times[-1] - times[0], 1e-3)) or 1)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = ms
        s.codec_context.gop_size = gop
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(frame(i, size), format="rgb24")
            f.pts, f.time_base = int(round(t * 1000)), ms
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path


def encode_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An .mp4 (AAC) with no video stream."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        n = int(16000 * seconds)
        samples = (np.sin(np.arange(n) / 10.0) * 0.3).astype(np.float32)[None]
        for k in range(0, n, 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k:k + 1024]), format="flt", layout="mono")
            f.sample_rate, f.pts = 16000, k
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path
