"""Benchmarks: the measured cost of each fusion strategy, side by side, on this machine.

    python -m experiments.bench SUITE [--quick] [--json] [--out-dir runs/bench]
                                [--device cpu|cuda] [--dtype bfloat16|float32] [--threads N]
                                [--backbone helium|helium_preview|qwen2_5_vl] [--pattern SHARDS]

SUITE is one of `layer` (paper Table 11), `attention` (varlen_attention backends vs dense),
`stream` (paper Figs. 5-6), `step` (a full training step per strategy, Table 1), `data`
(the data pipeline), `plan` (will a run config fit: its traced peak memory), or `all`. Each suite is `experiments.benchmarks.<suite>.run(quick,
out_dir, ...) -> dict`; this prints the dict as tables (or, with --json, exactly one JSON
object per suite on its own line) and the suites write their PNGs into --out-dir: runs/bench
by default, never docs/img unless asked (`--out-dir docs/img` refreshes the tracked plots of
docs/benchmarks.md; a --quick run there would replace them with smoke-size results).
Options a suite does not take (e.g. --backbone for `data`) are refused for that suite.
docs/benchmarks.md has the results of this machine and how to read them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import sys
import time
from typing import Any

from experiments.benchmarks import SUITES

OPTIONS = ("device", "dtype", "backbone", "pattern", "video_pattern", "config", "shapes", "gpus", "gpu_memory", "mfu",
           "gpu_tflops", "max_text_tokens", "max_image_tokens", "max_pixels", "frames", "search", "steps",
           "turns", "tokens_per_turn", "image_size", "ckpt", "layers")
"""Dispatcher flags passed to a suite's `run` as keyword arguments, when given."""
OUT_DIR = "runs/bench"
"""Where the PNGs go by default: under runs/ (git-ignored) like every other output."""


class SuiteUnavailable(RuntimeError):
    """The suite's module does not exist (yet): reported, not raised, by `main`."""


class UsageError(ValueError):
    """An unknown suite, or an option the suite does not take: reported with the valid ones."""


def load_suite(name: str):
    """-> the module `experiments.benchmarks.<name>`; SuiteUnavailable if it does not exist yet."""
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)} (or 'all')")
    module = f"experiments.benchmarks.{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the suite exists but one of its imports is missing: a real error
            raise
        raise SuiteUnavailable(f"suite {name!r} is not available: {module.replace('.', '/')}.py does not exist yet"
                               ) from None


def run_suite(name: str, quick: bool, out_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    run = load_suite(name).run
    accepted = inspect.signature(run).parameters
    refused = [k for k in options if k not in accepted]
    if refused:
        flags = ", ".join("--" + k for k in refused)
        raise UsageError(f"suite {name!r} does not take {flags}; its options: "
                         f"{[p for p in accepted if p not in ('quick', 'out_dir')]}")
    start = time.perf_counter()
    result = run(quick=quick, out_dir=out_dir, **options)
    return {"suite": name, **result, "wall_s": round(time.perf_counter() - start, 1)}


def finite(obj: Any) -> Any:
    """NaN/inf -> None so that the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def print_tables(result: dict[str, Any]) -> None:
    """Scalars as one key/value table; every list of row dicts as its own table; text as is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    summary = Table(title=f"bench {result['suite']}", show_header=False)
    summary.add_column("key", style="bold")
    summary.add_column("value", overflow="fold")
    tables, texts = [], []
    for k, v in result.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            tables.append((k, v))
        elif isinstance(v, str) and "\n" in v:
            texts.append((k, v))
        else:
            summary.add_row(k, _fmt(v))
    console.print(summary)
    for name, rows in tables:
        t = Table(title=f"{result['suite']}: {name}")
        cols = list(dict.fromkeys(c for r in rows for c in r))
        for c in cols:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(*(_fmt(r.get(c, "")) for c in cols))
        console.print(t)
    for name, text in texts:
        console.print(f"[bold]{result['suite']}: {name}[/bold]")
        console.print(text, markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", help=f"one of {', '.join(SUITES)}, or all")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the tests' smoke run)")
    p.add_argument("--json", action="store_true", help="one JSON object per suite on stdout")
    p.add_argument("--out-dir", default=OUT_DIR, help=f"where the PNGs go (default {OUT_DIR}; "
                   "docs/img for the plots of docs/benchmarks.md)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", default=None, help="layer: bfloat16 (default) or float32; plan --frames: inference precision")
    p.add_argument("--backbone", default=None, help="layer, stream: helium (default), helium_preview or qwen2_5_vl widths")
    p.add_argument("--pattern", default=None, help="data: shard pattern to read (default: a temporary synthetic set)")
    p.add_argument("--video-pattern", default=None, help="data: video shards to read at the video demo's settings "
                   "(default: a few video demo clips converted to a temporary set)")
    p.add_argument("--config", action="append", default=None,
                   help="plan: run config(s), composed in order (e.g. a paper config, then trainer/fsdp2_h100.yaml)")
    p.add_argument("--shapes", default=None, help="plan: architecture JSON for checkpoints absent here "
                   "(experiments/configs/shapes/*.json)")
    p.add_argument("--gpus", type=int, default=None, help="plan: GPUs of the run (default 8)")
    p.add_argument("--gpu-memory", default=None, help="plan: memory of one GPU (default 80GB)")
    p.add_argument("--mfu", type=float, default=None, help="plan: assumed model FLOP utilisation (default 0.4)")
    p.add_argument("--gpu-tflops", type=float, default=None, help="plan: peak TFLOP/s of one GPU (default 989, H100 bf16)")
    p.add_argument("--max-text-tokens", type=int, default=None, help="plan: override the data config's text cap")
    p.add_argument("--max-image-tokens", type=int, default=None, help="plan: override the data config's image cap")
    p.add_argument("--max-pixels", type=int, default=None, help="plan: override the data config's image size cap")
    p.add_argument("--frames", type=int, default=None, help="plan: cached-generation memory of a stream of F frames")
    p.add_argument("--search", type=int, default=None,
                   help="plan: traces spent on the largest caps that fit, when the config does not (default 3, 0: none)")
    p.add_argument("--steps", type=int, default=None, help="plan: optimizer steps of the run, for its total time")
    p.add_argument("--turns", type=int, default=None, help="stream: kyutai's table, turns of the session (256)")
    p.add_argument("--tokens-per-turn", type=int, default=None, help="stream, plan --frames: tokens decoded per turn (16)")
    p.add_argument("--image-size", type=int, default=None, help="stream, plan --frames: frame side in px (896)")
    p.add_argument("--ckpt", default=None, help="stream: a checkpoint's model instead of random --backbone widths")
    p.add_argument("--layers", type=int, default=None, help="stream: decoder blocks (CPU default 2, CUDA: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    names = list(SUITES) if a.suite == "all" else [a.suite]
    if a.suite != "all" and a.suite not in SUITES:
        p.error(f"unknown suite {a.suite!r}; valid suites: {', '.join(SUITES)} (or 'all')")
    import torch

    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads={a.threads} must be >= 1")
        torch.set_num_threads(a.threads)
    options = {k: getattr(a, k) for k in OPTIONS if getattr(a, k) is not None}
    status = 0
    for name in names:
        try:
            suite_options = options if a.suite != "all" else {
                k: v for k, v in options.items() if k in inspect.signature(load_suite(name).run).parameters}
            result = finite(run_suite(name, a.quick, a.out_dir, suite_options))
        except SuiteUnavailable as e:
            print(f"bench: {e}", file=sys.stderr)
            status = 2 if a.suite != "all" else status  # `all` runs what exists
            continue
        except UsageError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
        if a.json:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        else:
            print_tables(result)
    return status


if __name__ == "__main__":
    sys.exit(main())
