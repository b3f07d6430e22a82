"""The built-in synthetic benchmark: real, learnable tasks, no download.

    python -m data.synth --out DIR [--seed S] [--train N --val N --test N] [--tasks a,b]

writes DIR/{train,val,test}-%06d.tar (the `data.format` layout) and DIR/manifest.json.
Generation is deterministic: the same arguments give byte-identical shards. Tasks and
their groups are listed in `data.synth_tasks.TASKS` and docs/synth.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from data.format import ShardWriter, make_sample
from data.synth_tasks import DEFAULT_SIZES, TASKS

VERSION = 1
SPLITS = ("train", "val", "test")


def generate(out_dir: str | Path, seed: int = 0, train: int = 4000, val: int = 200, test: int = 200,
             tasks: list[str] | None = None, sizes: dict[str, int] | None = None, shard_size: int = 1000,
             progress: bool = True) -> dict:
    """Write the benchmark and return its manifest."""
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic tasks {unknown}; valid: {list(TASKS)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    counts = {"train": train, "val": val, "test": test}
    manifest = {"version": VERSION, "seed": seed, "counts": {}, "tasks": {t: TASKS[t][0] for t in tasks},
                "sizes": sizes, "shards": {}, "args": _args(seed, train, val, test, tasks, sizes)}
    start = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        for split_idx, split in enumerate(SPLITS):
            rng = random.Random(f"{seed}-{split}")  # independent streams per split
            job = bar.add_task(f"synth {split}", total=counts[split])
            per_task = {t: 0 for t in tasks}
            with ShardWriter(out, split, max_count=shard_size) as w:
                for i in range(counts[split]):
                    task = tasks[i % len(tasks)]  # balanced task mixture
                    group, fn = TASKS[task]
                    conv, files = fn(rng, sizes[group])
                    conv.update(task=task, group=group)
                    w.write(make_sample(f"{split}-{i:07d}", conv, files))
                    per_task[task] += 1
                    bar.advance(job)
            manifest["counts"][split] = per_task
            manifest["shards"][split] = [Path(s).name for s in sorted(out.glob(f"{split}-*.tar"))]
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _args(seed, train, val, test, tasks, sizes) -> dict:
    return {"seed": seed, "train": train, "val": val, "test": test, "tasks": list(tasks), "sizes": dict(sizes),
            "version": VERSION}


def ensure_synth(out_dir: str | Path, seed: int = 0, train: int = 4000, val: int = 200, test: int = 200,
                 tasks: list[str] | None = None, sizes: dict[str, int] | None = None, progress: bool = True) -> Path:
    """Generate the benchmark unless `out_dir` already holds one made with these arguments."""
    out = Path(out_dir)
    m = out / "manifest.json"
    want = _args(seed, train, val, test, list(tasks or TASKS), {**DEFAULT_SIZES, **(sizes or {})})
    if m.is_file():
        have = json.loads(m.read_text())
        if have.get("args") == want and all((out / s).is_file() for sh in have["shards"].values() for s in sh):
            return out
    generate(out, seed, train, val, test, tasks, sizes, progress=progress)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    a = p.parse_args(argv)
    m = generate(a.out, a.seed, a.train, a.val, a.test, [t for t in a.tasks.split(",") if t])
    total = sum(sum(c.values()) for c in m["counts"].values())
    print(f"wrote {total} samples in {m['seconds']} s to {a.out}: "
          + ", ".join(f"{s} {len(m['shards'][s])} shard(s)" for s in SPLITS))


if __name__ == "__main__":
    main()
