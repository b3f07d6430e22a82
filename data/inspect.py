"""Run shards through the whole pipeline and report what happens to them.

    python -m data.inspect PATTERN [--template helium] [--tokenizer char] [--json]
        [--max-text-tokens 2048] [--max-image-tokens 20480] [--max-pixels 802816] [--video]

Decodes, validates, tokenises and packs every sample once (no shuffling) and reports
samples read / kept / skipped by reason, packed rows, fill ratios of both caps, and
histograms of text and image tokens per sample. `--json` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter

from data.datamodule import expand_shards, resolve_tokenizer
from data.dataset import SampleProcessor, ShardStream, VideoOptions
from data.templates import ChatTemplate


def histogram(values: list[int], bins: int = 8) -> list[dict]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // width for v in values)
    return [{"from": lo + b * width, "to": lo + (b + 1) * width - 1, "count": counts.get(b, 0)}
            for b in range((hi - lo) // width + 1)]


def inspect(pattern: str, template: str = "helium", tokenizer: str = "char", max_text_tokens: int = 2048,
            max_image_tokens: int = 20480, max_pixels: int = 896 * 896, video: VideoOptions | None = None) -> dict:
    urls = expand_shards(pattern, "train")
    tok = resolve_tokenizer(tokenizer)
    processor = SampleProcessor(ChatTemplate(template, tok), max_pixels, video=video or VideoOptions())
    ds = ShardStream(urls, processor, dict(max_text_tokens=max_text_tokens, max_image_tokens=max_image_tokens),
                     shuffle=False, repeat=False)
    text_tokens, image_tokens = [], []
    orig_samples = ds.samples

    def recording(*a, **k):
        for s in orig_samples(*a, **k):
            text_tokens.append(s.num_text)
            image_tokens.append(s.num_image_tokens)
            yield s

    ds.samples = recording  # observe samples on their way to the packer
    start = time.perf_counter()
    rows = sum(1 for _ in ds.batches())
    seconds = time.perf_counter() - start
    st = ds.stats()
    packer = ds.last_packer
    fill_text, fill_image = packer.stats.fill(max_text_tokens, max_image_tokens)
    skipped = {k: v for k, v in st.items() if k not in ("samples_read", "samples_kept") and v}
    return {
        "shards": len(urls), "samples_read": st.get("samples_read", 0), "samples_kept": st.get("samples_kept", 0) - packer.stats.oversize,
        "skipped": skipped, "rows": rows, "fill_text": round(fill_text, 4), "fill_image": round(fill_image, 4),
        "text_tokens_histogram": histogram(text_tokens), "image_tokens_histogram": histogram(image_tokens),
        "seconds": round(seconds, 2), "samples_per_s": round(st.get("samples_read", 0) / max(seconds, 1e-9), 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern", help="shard directory, glob or brace pattern")
    p.add_argument("--template", default="helium")
    p.add_argument("--tokenizer", default="char")
    p.add_argument("--max-text-tokens", type=int, default=2048)
    p.add_argument("--max-image-tokens", type=int, default=20480)
    p.add_argument("--max-pixels", type=int, default=896 * 896)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if a.json else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        r = inspect(a.pattern, a.template, a.tokenizer, a.max_text_tokens, a.max_image_tokens, a.max_pixels)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if a.json:
        print(json.dumps(r))
        return
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"data.inspect {a.pattern}")
    t.add_column("what")
    t.add_column("value", justify="right")
    for k in ("shards", "samples_read", "samples_kept", "rows", "fill_text", "fill_image", "samples_per_s"):
        t.add_row(k, str(r[k]))
    for k, v in sorted(r["skipped"].items()):
        t.add_row(f"skipped: {k}", str(v))
    c.print(t)
    for name in ("text_tokens_histogram", "image_tokens_histogram"):
        h = Table(title=name.replace("_", " "))
        h.add_column("tokens")
        h.add_column("samples", justify="right")
        h.add_column("")
        top = max((b["count"] for b in r[name]), default=1) or 1
        for b in r[name]:
            h.add_row(f"{b['from']}-{b['to']}", str(b["count"]), "█" * round(30 * b["count"] / top))
        c.print(h)


if __name__ == "__main__":
    main()
