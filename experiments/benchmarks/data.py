"""Suite `data`: packed samples per second of the data pipeline, and how full the rows are.

    python -m experiments.bench data [--quick] [--json] [--pattern 'shards/train-{000000..000009}.tar']

Wraps `data.bench.run` (one reader in this process: decode, validate, tokenize with the
chat template, pack). Without --pattern it first writes a small built-in synthetic set
(`data.synth.ensure_synth`, all tasks) into a temporary directory; the generation time is
reported apart. Two packing configurations are read from the same shards:

    demo    the demo's caps: 512 text / 1024 image tokens per row, images <= 112 x 112
    paper   the paper's caps: 2048 text / 20480 image tokens per row, images <= 896 x 896

fill_text / fill_image: mean fraction of each cap a row uses. The synthetic images are
small (56-112 px, 4-16 tokens), so rows fill on text long before the image cap.

Video rows (`video_throughput`): an h264 mp4 per clip size (demo: 112x112, paper: 640x360,
30 fps, encoded first and not timed) read with the paper's 2 fps sampling by the one reader
(`casa.processing.video`, one decoder thread) and preprocessed (`patchify` at the frame cap:
56^2 demo, 448^2 paper): frames/s, and x_realtime = seconds of video per second of work (a
live stream needs 1).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.benchmarks import measure

CONFIGS = {
    "demo": dict(max_text_tokens=512, max_image_tokens=1024, max_pixels=112 * 112),
    "paper": dict(max_text_tokens=2048, max_image_tokens=20480, max_pixels=896 * 896),
}
FULL = dict(samples=600, seconds=20.0, max_batches=None)
QUICK = dict(samples=24, seconds=0.0, max_batches=2)


def plot(rows: list[dict[str, Any]], out_dir: str, tag: str) -> str:
    plt = measure.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["config"] for r in rows]
    bars = axes[0].bar(names, [r["samples_per_s"] for r in rows], color="tab:blue")
    axes[0].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[0].set_title("packed samples / s (one reader)")
    x = range(len(rows))
    axes[1].bar([i - 0.2 for i in x], [r["fill_text"] for r in rows], width=0.4, label="text cap")
    axes[1].bar([i + 0.2 for i in x], [r["fill_image"] for r in rows], width=0.4, label="image cap")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("mean fill of each cap per row")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"data pipeline ({tag})", fontsize=10)
    return measure.save_figure(fig, out_dir, "data")


def run(quick: bool, out_dir: str, pattern: str | None = None) -> dict[str, Any]:
    from data.bench import run as bench

    cfg = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="casa-bench-synth-") as tmp:
        generated = None
        if pattern is None:
            from data.synth import ensure_synth

            start = time.perf_counter()
            pattern = str(ensure_synth(Path(tmp) / "synth", train=cfg["samples"], val=0, test=0, progress=False))
            generated = {"samples": cfg["samples"], "seconds": round(time.perf_counter() - start, 2)}
        rows = []
        for name, caps in CONFIGS.items():
            r = bench(pattern, seconds=cfg["seconds"], max_batches=cfg["max_batches"], **caps)
            rows.append({"config": name, **{k: v for k, v in r.items() if k != "skipped"},
                         "samples_per_row": round(r["samples"] / max(r["batches"], 1), 2),
                         "skipped": sum(r["skipped"].values())})
    import torch

    result: dict[str, Any] = {"meta": measure.machine_info(torch.device("cpu")) | {
        "pattern": "built-in synthetic set (temporary)" if generated else pattern}}
    if generated:
        result["synth_generation"] = generated
    for r in rows:
        result[f"{r['config']}_samples_per_s"] = r["samples_per_s"]
        result[f"{r['config']}_fill_text"] = r["fill_text"]
        result[f"{r['config']}_fill_image"] = r["fill_image"]
    result["rows"] = rows
    with tempfile.TemporaryDirectory(prefix="casa-bench-video-") as tmp:
        video = video_throughput(quick, Path(tmp))
    for r in video:
        result[f"video_{r['clip']}_frames_per_s"] = r["frames_per_s"]
    result["video_rows"] = video
    result["plots"] = [plot(rows, out_dir, "quick" if quick else "one reader, this machine")]
    return result


# ---------------------------------------------------------------------------------- video
VIDEO_CLIPS = {  # name -> (width, height, seconds at 30 fps, frame pixel cap: the run's frame_max_pixels)
    "demo": (112, 112, 60, 56 * 56),
    "paper": (640, 360, 30, 448 * 448),
}
QUICK_VIDEO_SECONDS = 2


def moving_frames(width: int, height: int, n: int):
    """n frames of shapes sliding over a gradient: content that moves, as a codec sees real video."""
    import numpy as np
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        a = np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        img = Image.fromarray(a)
        d = ImageDraw.Draw(img)
        for k in range(4):
            x = (i * (3 + k) + 40 * k) % width
            d.ellipse((x, height * k // 5, x + width // 6, height * k // 5 + height // 6), fill=(255, 40 * k, 0))
        yield img


def video_throughput(quick: bool, tmp: Path) -> list[dict[str, Any]]:
    """Decode (one decoder thread, the paper's 2 fps sampling with seeks) + preprocess
    (`patchify` at the frame cap) of an h264 mp4 per clip size -> frames/s and how much faster
    than real time (a live stream consumes 2 frames per second of video)."""
    from casa.processing.image import patchify
    from casa.processing.video import read_video
    from data.video import VideoWriter

    rows = []
    for name, (w, h, seconds, cap) in VIDEO_CLIPS.items():
        seconds = QUICK_VIDEO_SECONDS if quick else seconds
        path = tmp / f"{name}.mp4"
        with VideoWriter(path, rate=30) as writer:
            for i, img in enumerate(moving_frames(w, h, 30 * seconds)):
                writer.write(img, i / 30)
        start = time.perf_counter()
        frames = read_video(path, fps=2.0, max_duration=float(seconds) + 1, threads=1)
        decoded = time.perf_counter() - start
        tokens = 0
        for f in frames:
            pv, grid = patchify(f.image, cap)
            tokens += grid[0] * grid[1] * grid[2] // 4
        total = time.perf_counter() - start
        rows.append({"clip": name, "size": f"{w}x{h}", "video_s": seconds, "source_fps": 30, "frames": len(frames),
                     "decode_s": round(decoded, 3), "preprocess_s": round(total - decoded, 3),
                     "frames_per_s": round(len(frames) / total, 1), "image_tokens_per_s": round(tokens / total),
                     "x_realtime": round(seconds / total, 1)})
    return rows
