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
