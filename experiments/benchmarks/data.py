"""Suite `data`: packed samples per second of the data pipeline, and how full the rows are.

    python -m experiments.bench data [--quick] [--json] [--pattern 'shards/train-{000000..000009}.tar']
                                     [--video-pattern 'runs/video-demo/shards/train-*.tar']

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

Video shards (`video_shards`): the training reader on the video demo's shards (--video-pattern,
else a few `data.video_demo` clips converted here) at the demo's caps (512 / 1024 tokens,
56^2 frames, strict 2 fps), then the demo model's optimizer steps on rows it packed, in the
same process: x_consumption = rows read per second / rows the demo trains per second
(reader on one thread as in a DataLoader worker, the steps at torch's thread count).
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


def run(quick: bool, out_dir: str, pattern: str | None = None, video_pattern: str | None = None) -> dict[str, Any]:
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
    with tempfile.TemporaryDirectory(prefix="casa-bench-video-shards-") as tmp:
        shards = video_shards(quick, Path(tmp), video_pattern)
    result.update({f"video_shards_{k}": shards[k] for k in ("rows_per_s", "frames_per_s", "demo_steps_per_s",
                                                             "x_consumption")})
    result["video_shards"] = [shards]
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


# ---------------------------------------------------------------------------------- video shards
VIDEO_DEMO_CONFIG = "experiments/configs/demo.yaml"
"""The video demo's model and caps (video_demo.yaml layers data paths over it)."""
VIDEO_DEMO_CAPS = dict(max_text_tokens=512, max_image_tokens=1024, max_pixels=112 * 112)
VIDEO_DEMO_SAMPLING = dict(min_duration=0.0, frame_max_pixels=56 * 56)
VIDEO_SHARDS = dict(clips=40, seconds=20.0, steps=40, rounds=4)
QUICK_VIDEO_SHARDS = dict(clips=4, seconds=0.0, steps=2, rounds=1)


def video_demo_shards(tmp: Path, clips: int) -> str:
    """A small set of the video demo's training shards, made as the README makes them:
    `data.video_demo` clips (160 px, 10 fps h264) converted at the demo's settings -> pattern."""
    from data.converters import convert_video_files
    from data.dataset import VideoOptions
    from data.video_demo import write_demo

    d = tmp / "video-demo"
    write_demo(d, clips=clips, val=0)
    sampling = VideoOptions(**VIDEO_DEMO_SAMPLING)
    for kind, records, prefix in (("livecc", "livecc.jsonl", "train"), ("videos", "videos.jsonl", "train-qa")):
        convert_video_files(kind, d / records, d / "videos", d / "shards", prefix=prefix, sampling=sampling,
                            progress=False)
    return str(d / "shards" / "train-*.tar")


def demo_trainer():
    """-> step(batch): one optimizer step of the video demo's model (demo.yaml's tiny CASA⊕,
    Adam at the demo's learning rates) on a packed row, as the demo trains (one row a step).
    Lightning's per-step work (logging, callbacks) comes on top in a real run, so the real
    demo consumes rows more slowly than these steps: the ratio they give errs on the low side."""
    import torch

    from casa.rebuild import build_model
    from casa.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(VIDEO_DEMO_CONFIG).train()
    opt = build_optimizer(model.parameter_groups(), lr_new=1e-3, lr_pretrained=2e-4)

    def step(batch) -> None:
        opt.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        opt.step()

    return step


def video_shards(quick: bool, tmp: Path, pattern: str | None = None) -> dict[str, Any]:
    """The training reader on the video demo's shards (`pattern`, else a small set made here)
    at the demo's caps and sampling, and the demo model's steps on rows it packed, in
    alternating rounds in this process so that both see the same load: x_consumption = rows
    read per second / rows trained per second (the target is >= 5, as the image path). The
    reader runs on one thread, as a DataLoader worker does (PyTorch sets 1 there); the steps
    at torch's thread count (--threads). Reading time includes filling the packing buffer."""
    import torch

    from data.bench import training_stream
    from data.dataset import VideoOptions

    cfg = QUICK_VIDEO_SHARDS if quick else VIDEO_SHARDS
    made = pattern is None
    if made:
        pattern = video_demo_shards(tmp, cfg["clips"])
    stream = training_stream(pattern, video=VideoOptions(**VIDEO_DEMO_SAMPLING), **VIDEO_DEMO_CAPS)
    reader, step, threads = stream.batches(), demo_trainer(), torch.get_num_threads()
    rows = samples = frames = steps = 0
    read_s = step_s = 0.0
    kept: list = []  # the rows the steps train on
    for r in range(cfg["rounds"]):
        torch.set_num_threads(1)
        start = time.perf_counter()
        while True:
            batch = next(reader)
            rows, samples, frames = rows + 1, samples + batch.num_samples, frames + batch.num_images
            if len(kept) < 8:
                kept.append(batch)
            if rows >= 2 * (r + 1) and time.perf_counter() - start >= cfg["seconds"] / cfg["rounds"]:
                break
        read_s += time.perf_counter() - start
        torch.set_num_threads(threads)
        if r == 0:
            step(kept[0])  # first-call allocations, not the steady state
        start = time.perf_counter()
        for _ in range(cfg["steps"] // cfg["rounds"]):
            step(kept[steps % len(kept)])
            steps += 1
        step_s += time.perf_counter() - start
    rows_per_s, steps_per_s = rows / read_s, steps / step_s
    return {"pattern": f"{cfg['clips']} video demo clips (temporary)" if made else pattern,
            "rows": rows, "samples_per_row": round(samples / rows, 2), "frames_per_row": round(frames / rows, 1),
            "rows_per_s": round(rows_per_s, 3), "frames_per_s": round(frames / read_s, 1), "read_s": round(read_s, 2),
            "demo_steps": steps, "demo_steps_per_s": round(steps_per_s, 3), "step_s": round(step_s, 2),
            "x_consumption": round(rows_per_s / steps_per_s, 2),
            "skipped": sum(v for k, v in stream.stats().items() if k not in ("samples_read", "samples_kept", "epochs"))}
