"""The built-in synthetic benchmark: real, learnable tasks in the paper's groups, no download.

    python -m data.synth --out DIR [--seed S] [--train N --val N --test N] [--tasks a,b]
                         [--image-size PX | --image-size coarse=56,reading=224]

writes DIR/{train,val,test}-%06d.tar (the `data.format` layout) and DIR/manifest.json.
Tasks and groups: `data.synth_tasks.TASKS`, docs/synth.md.

Determinism: sample j of task t in split s is drawn from its own
`random.Random(f"{seed}/{s}/{t}/{j}")`, so the same arguments give byte-identical shards
(the shard writer fixes tar mtimes), and adding a task or growing a split leaves the
other samples unchanged. Tasks are interleaved round-robin, so every shard mixes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from data.format import ShardWriter, make_sample
from data.synth_tasks import DEFAULT_SIZES, TASKS

VERSION = 2  # bump whenever a generator changes its output: ensure_synth then regenerates
SPLITS = ("train", "val", "test")
SHARD_SIZE = 1000


def resolve_sizes(image_size: int | dict[str, int] | None) -> dict[str, int]:
    """Image side per group: None -> DEFAULT_SIZES; an int -> every group; a dict
    overrides the groups it names."""
    if image_size is None:
        sizes = dict(DEFAULT_SIZES)
    elif isinstance(image_size, int):
        sizes = {g: image_size for g in DEFAULT_SIZES}
    else:
        unknown = sorted(set(image_size) - set(DEFAULT_SIZES))
        if unknown:
            raise ValueError(f"image_size names unknown groups {unknown}; valid (groups with images): "
                             f"{list(DEFAULT_SIZES)}")
        sizes = {**DEFAULT_SIZES, **image_size}
    for g, px in sizes.items():
        # below 28 px the vision encoder (14 px patches, 2x2 merge) has no full token
        if not isinstance(px, int) or px < 28:
            raise ValueError(f"image_size[{g!r}]={px!r} must be an int >= 28 (pixels)")
    return sizes


def resolve_tasks(tasks: list[str] | None) -> list[str]:
    tasks = list(tasks) if tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks={tasks} must be distinct names from {list(TASKS)} (unknown: {unknown})")
    return tasks


def split_counts(total: int, tasks: list[str]) -> dict[str, int]:
    """Round-robin share of `total` samples per task (the first tasks get the remainder)."""
    return {t: total // len(tasks) + (i < total % len(tasks)) for i, t in enumerate(tasks)}


def make_one(seed: int, split: str, task: str, index: int, size: int) -> dict:
    """The webdataset sample `index` of `task` in `split` (a pure function of its arguments)."""
    group, fn = TASKS[task]
    conv, files = fn(random.Random(f"{seed}/{split}/{task}/{index}"), size)  # size: 0 for the text group
    conv.update(task=task, group=group)
    return make_sample(f"{split}-{task}-{index:06d}", conv, files)


def _args(seed: int, counts: dict[str, int], tasks: list[str], sizes: dict[str, int]) -> dict:
    """What the shards depend on: ensure_synth regenerates when any of it differs."""
    return {"version": VERSION, "seed": seed, "splits": dict(counts), "tasks": list(tasks), "image_size": dict(sizes)}


def generate(out_dir: str | Path, seed: int = 0, train: int = 4000, val: int = 200, test: int = 200,
             tasks: list[str] | None = None, image_size: int | dict[str, int] | None = None,
             shard_size: int = SHARD_SIZE, progress: bool = True) -> dict:
    """Write the benchmark into `out_dir` and return its manifest.

    Shards are written into a private temporary directory and moved in with atomic renames,
    the manifest last: a concurrent reader (or a second rank generating the same,
    byte-identical data) never sees a half-written shard, and a directory with a manifest
    is complete."""
    tasks, sizes = resolve_tasks(tasks), resolve_sizes(image_size)
    counts = {"train": train, "val": val, "test": test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"{split}={n} must be >= 0")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    per_split: dict[str, dict[str, int]] = {}
    shards: dict[str, list[str]] = {}
    start = time.perf_counter()
    columns = (TextColumn("[bold]synth {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, disable=not progress) as bar:
            for split in SPLITS:
                per_task = split_counts(counts[split], tasks)
                job = bar.add_task(split, total=counts[split])
                with ShardWriter(tmp, split, max_count=shard_size) as w:
                    # round-robin interleaving: every shard (and every training batch) mixes the tasks
                    for j in range(max(per_task.values(), default=0)):
                        for t in tasks:
                            if j < per_task[t]:
                                w.write(make_one(seed, split, t, j, sizes.get(TASKS[t][0], 0)))
                                bar.advance(job)
                    names = [Path(s).name for s in w.shards] if counts[split] else []
                per_split[split], shards[split] = per_task, names
        # `tasks` maps task -> group: the datamodules read it to group metrics
        manifest = {"version": VERSION, "seed": seed, "tasks": {t: TASKS[t][0] for t in tasks}, "task_order": tasks,
                    "image_size": sizes, "splits": counts, "counts": per_split, "shards": shards}
        manifest_text = json.dumps(manifest, indent=1) + "\n"
        final = out / "manifest.json"
        if not final.is_file() or final.read_text() != manifest_text:
            # until the new manifest lands the directory is incomplete; an identical one (another rank
            # generating the same bytes) stays, so a reader never finds it missing
            final.unlink(missing_ok=True)
        for old in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if old.name not in {n for names in shards.values() for n in names}:
                old.unlink()  # a stale shard of a bigger earlier run would be read as data
        for names in shards.values():
            for name in names:
                os.replace(tmp / name, out / name)
        (tmp / "manifest.json").write_text(manifest_text)
        os.replace(tmp / "manifest.json", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # reported, not stored in the manifest: the directory stays byte-reproducible
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


def _manifest_args(m: dict) -> dict:
    return _args(m.get("seed"), m.get("splits", {}), m.get("task_order", []), m.get("image_size", {})) | {
        "version": m.get("version")}


def ensure_synth(out_dir: str | Path, seed: int = 0, train: int = 4000, val: int = 200, test: int = 200,
                 tasks: list[str] | None = None, image_size: int | dict[str, int] | None = None,
                 progress: bool = True) -> Path:
    """`out_dir`, generating the benchmark there unless its manifest records the same
    arguments (and generator version) and all its shards exist."""
    tasks, sizes = resolve_tasks(tasks), resolve_sizes(image_size)
    out = Path(out_dir)
    want = _args(seed, {"train": train, "val": val, "test": test}, tasks, sizes)
    m = out / "manifest.json"
    if m.is_file():
        try:
            have = json.loads(m.read_text())
        except json.JSONDecodeError:
            have = {}
        shards = [out / s for names in have.get("shards", {}).values() for s in names]
        if have and _manifest_args(have) == want and all(p.is_file() for p in shards):
            return out
    generate(out, seed, train, val, test, tasks, sizes, progress=progress)
    return out


def parse_image_size(spec: str) -> int | dict[str, int]:
    """"112" -> 112 (every group); "coarse=56,reading=224" -> {"coarse": 56, "reading": 224}."""
    try:
        if "=" not in spec:
            return int(spec)
        return {g.strip(): int(px) for g, px in (item.split("=") for item in spec.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {spec!r}: expected PX or GROUP=PX[,GROUP=PX] "
                                         f"with groups from {list(DEFAULT_SIZES)}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=4000, help="training samples (all tasks together)")
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    p.add_argument("--image-size", type=parse_image_size, default=None,
                   help=f"image side in px for every group, or GROUP=PX,... (default {DEFAULT_SIZES})")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per shard")
    a = p.parse_args(argv)
    try:
        m = generate(a.out, a.seed, a.train, a.val, a.test, [t for t in a.tasks.split(",") if t], a.image_size,
                     a.shard_size)
    except ValueError as e:
        p.error(str(e))
    total = sum(m["splits"].values())
    print(f"wrote {total} samples ({len(m['tasks'])} tasks) in {m['seconds']} s to {a.out}: "
          + ", ".join(f"{s} {m['splits'][s]} in {len(m['shards'][s])} shard(s)" for s in SPLITS))


if __name__ == "__main__":
    main()
