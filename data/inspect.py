"""Run shards through the whole pipeline and report what happens to them.

    python -m data.inspect PATTERN [--template helium] [--tokenizer DIR] [--json]
        [--max-text-tokens 2048] [--max-image-tokens 20480] [--max-pixels 802816]
        [--frame-max-pixels 200704] [--fps 2] [--max-duration 180]

Decodes, validates, tokenises and packs every sample once (no shuffling, one reader) and
reports samples read / kept / skipped by reason, packed rows, fill ratios of both caps,
and histograms of text and image tokens per kept sample. Without `--tokenizer` the
built-in character tokenizer is built in a temporary directory. `--json` prints one JSON
object (keys: shards, samples_read, samples_kept, skipped, rows, fill_text, fill_image,
text_tokens, image_tokens, seconds, samples_per_s).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter

from casa.batch import image_token_count
from casa.processing.image import MERGE, MIN_PIXELS
from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import build_tokenizer, load_tokenizer
from data.datamodule import expand_shards
from data.dataset import SKIP_REASONS, SampleProcessor, ShardStream, VideoOptions


def histogram(values: list[int], bins: int = 8) -> list[dict]:
    """-> [{"from", "to", "count"}] over equal-width integer bins."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // width for v in values)
    return [{"from": lo + b * width, "to": lo + (b + 1) * width - 1, "count": counts.get(b, 0)}
            for b in range((hi - lo) // width + 1)]


def inspect(pattern: str, template: str = "helium", tokenizer=None, max_text_tokens: int = 2048,
            max_image_tokens: int = 20480, max_pixels: int = 896 * 896, min_pixels: int = MIN_PIXELS,
            video: VideoOptions | None = None, pack_buffer: int = 64, split: str = "train") -> dict:
    """Shards -> report dict (see module doc). `tokenizer`: a tokenizer object, a directory,
    or None (the char tokenizer, built in a temporary directory)."""
    urls = expand_shards(pattern, split)
    if tokenizer is None:
        with tempfile.TemporaryDirectory(prefix="casa-inspect-tok-") as d:
            tokenizer = build_tokenizer(d)
    elif isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    processor = SampleProcessor(ChatTemplate(template, tokenizer), max_pixels, min_pixels, video or VideoOptions())
    ds = ShardStream(urls, processor, dict(max_text_tokens=max_text_tokens, max_image_tokens=max_image_tokens,
                                           buffer_size=pack_buffer), shuffle=False, repeat=False)
    text_tokens: list[int] = []
    image_tokens: list[int] = []
    start = time.perf_counter()
    rows = 0
    for batch in ds.batches():
        rows += 1
        cu = batch.sample_cu_seqlens.tolist()
        text_tokens += [b - a for a, b in zip(cu, cu[1:])]
        per_image = image_token_count(batch.image_grid_thw, MERGE).tolist()
        # image tokens per sample: images are in stream order, each before a text index of its sample
        pos = batch.image_text_position.tolist()
        for a, b in zip(cu, cu[1:]):
            image_tokens.append(sum(n for n, p in zip(per_image, pos) if a <= p < b))
    seconds = time.perf_counter() - start
    st = ds.stats()
    fill_text, fill_image = ds.last_packer.stats.fill(max_text_tokens, max_image_tokens)
    return {
        "shards": len(urls), "samples_read": st["samples_read"], "samples_kept": st["samples_kept"],
        "skipped": {r: st[r] for r in SKIP_REASONS if st[r]}, "rows": rows,
        "fill_text": round(fill_text, 4), "fill_image": round(fill_image, 4),
        "text_tokens": histogram(text_tokens), "image_tokens": histogram(image_tokens),
        "seconds": round(seconds, 3), "samples_per_s": round(st["samples_kept"] / max(seconds, 1e-9), 1),
    }


def _print_table(r: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=title)
    t.add_column("what")
    t.add_column("value", justify="right")
    for k in ("shards", "samples_read", "samples_kept", "rows", "fill_text", "fill_image", "samples_per_s"):
        t.add_row(k, str(r[k]))
    for k, v in sorted(r["skipped"].items()):
        t.add_row(f"skipped: {k}", str(v))
    c.print(t)
    for name in ("text_tokens", "image_tokens"):
        h = Table(title=f"{name.replace('_', ' ')} per sample")
        h.add_column("tokens")
        h.add_column("samples", justify="right")
        h.add_column("")
        top = max((b["count"] for b in r[name]), default=1) or 1
        for b in r[name]:
            h.add_row(f"{b['from']}-{b['to']}", str(b["count"]), "#" * round(30 * b["count"] / top))
        c.print(h)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern", help="shard directory, glob or brace pattern")
    p.add_argument("--split", default="train", help="for a directory: which {split}-*.tar to read")
    p.add_argument("--template", default="helium")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the char tokenizer)")
    p.add_argument("--max-text-tokens", type=int, default=2048)
    p.add_argument("--max-image-tokens", type=int, default=20480)
    p.add_argument("--max-pixels", type=int, default=896 * 896)
    p.add_argument("--frame-max-pixels", type=int, default=448 * 448)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--max-duration", type=float, default=180.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    # skipped samples are reported in the table; per-sample warnings only without --json
    logging.basicConfig(level=logging.ERROR if a.json else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        video = VideoOptions(fps=a.fps, max_duration=a.max_duration, frame_max_pixels=a.frame_max_pixels)
        r = inspect(a.pattern, a.template, a.tokenizer, a.max_text_tokens, a.max_image_tokens, a.max_pixels,
                    video=video, split=a.split)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if a.json:
        print(json.dumps(r))
    else:
        _print_table(r, f"data.inspect {a.pattern}")


if __name__ == "__main__":
    main()
