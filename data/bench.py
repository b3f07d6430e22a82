"""Data-pipeline throughput: packed samples per second from shards, and the fill ratios.

    python -m data.bench PATTERN [--template helium] [--tokenizer DIR] [--seconds 10]
        [--max-text-tokens 2048] [--max-image-tokens 20480] [--max-pixels 802816] [--json]
        [--min-duration 10] [--frame-max-pixels 200704]          (video samples' sampling)

Runs the training stream (shuffled, packed, one row per batch, one reader in this process) for `--seconds`
or until `--max-batches`, and reports samples/s, batches/s, text and image tokens/s and
the mean fill of both caps. `run()` is what `python -m experiments.bench data` calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

from casa.processing.image import MIN_PIXELS
from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import build_tokenizer, load_tokenizer
from data.datamodule import expand_shards
from data.dataset import SampleProcessor, ShardStream, VideoOptions


def training_stream(pattern: str, template: str = "helium", tokenizer: str | None = None, max_text_tokens: int = 2048,
                    max_image_tokens: int = 20480, max_pixels: int = 896 * 896, min_pixels: int = MIN_PIXELS,
                    pack_buffer: int = 64, seed: int = 0, video: VideoOptions | None = None) -> ShardStream:
    """The training stream `run` times (shuffled, packed, one row per batch, repeating);
    tokenizer None: the character-level one."""
    urls = expand_shards(pattern, "train")
    if tokenizer is None:
        with tempfile.TemporaryDirectory(prefix="casa-bench-tok-") as d:
            tok = build_tokenizer(d)
    else:
        tok = load_tokenizer(tokenizer)
    processor = SampleProcessor(ChatTemplate(template, tok), max_pixels, min_pixels, video or VideoOptions())
    return ShardStream(urls, processor, dict(max_text_tokens=max_text_tokens, max_image_tokens=max_image_tokens,
                                             buffer_size=pack_buffer), 1, shuffle=True, repeat=True, seed=seed)


def run(pattern: str, template: str = "helium", tokenizer: str | None = None, max_text_tokens: int = 2048,
        max_image_tokens: int = 20480, max_pixels: int = 896 * 896, min_pixels: int = MIN_PIXELS,
        pack_buffer: int = 64, seconds: float = 10.0, max_batches: int | None = None,
        seed: int = 0, video: VideoOptions | None = None) -> dict:
    """-> {"batches", "samples", "seconds", "samples_per_s", "batches_per_s", "images_per_s",
    "text_tokens_per_s", "image_tokens_per_s", "fill_text", "fill_image", "skipped"}; images
    count video frames (one row per batch: batches_per_s is rows/s)."""
    if seconds <= 0 and not max_batches:
        raise ValueError(f"bench: seconds={seconds} must be > 0 or max_batches given")
    ds = training_stream(pattern, template, tokenizer, max_text_tokens, max_image_tokens, max_pixels, min_pixels,
                         pack_buffer, seed, video)
    batches = samples = text = image = images = 0
    start = time.perf_counter()
    for batch in ds.batches():
        batches += 1
        samples += batch.num_samples
        text += batch.num_text_tokens
        image += batch.num_image_tokens
        images += batch.num_images
        elapsed = time.perf_counter() - start
        if (max_batches and batches >= max_batches) or (not max_batches and elapsed >= seconds):
            break
    elapsed = max(time.perf_counter() - start, 1e-9)
    stats = ds.stats()
    return {
        "batches": batches, "samples": samples, "seconds": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 2), "batches_per_s": round(batches / elapsed, 3),
        "images_per_s": round(images / elapsed, 1),
        "text_tokens_per_s": round(text / elapsed, 1), "image_tokens_per_s": round(image / elapsed, 1),
        "fill_text": round(text / (max(batches, 1) * max_text_tokens), 4),  # one row per batch here
        "fill_image": round(image / (max(batches, 1) * max(max_image_tokens, 1)), 4),
        "skipped": {k: v for k, v in stats.items() if k not in ("samples_read", "samples_kept", "epochs") and v},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern")
    p.add_argument("--template", default="helium")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-text-tokens", type=int, default=2048)
    p.add_argument("--max-image-tokens", type=int, default=20480)
    p.add_argument("--max-pixels", type=int, default=896 * 896)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--min-duration", type=float, default=10.0, help="video: shorter clips get 20 frames "
                   "(0: strict --fps, as the video demo trains)")
    p.add_argument("--frame-max-pixels", type=int, default=448 * 448, help="video: frame pixel cap (video demo: 3136)")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    r = run(a.pattern, a.template, a.tokenizer, a.max_text_tokens, a.max_image_tokens, a.max_pixels,
            seconds=a.seconds, max_batches=a.max_batches,
            video=VideoOptions(min_duration=a.min_duration, frame_max_pixels=a.frame_max_pixels))
    if a.json:
        print(json.dumps(r))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"data.bench {a.pattern}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in r.items():
        t.add_row(k, str(v))
    Console().print(t)


if __name__ == "__main__":
    main()
