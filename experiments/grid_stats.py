"""A grid's paired contrasts and its answer prior, from its runs' per-item predictions.

Every run keeps the answers its last validation generated (`<run>/predictions/val_step_*.jsonl`,
`CasaModule.val_predictions`). Each is scored again here with the validation's own metric
class (`casa.train.metrics`), so an item's score is the one the run's table averaged. The
contrasts a grid file declares (`compare:`) are then paired by seed (the `aggregate` axis'
label) and by item (its key), and judged as one family (`experiments.contrasts.judge`) on
the "avg" quantity: the groups weighted equally, as the tables' avg column.

The answer prior is the score, on the same evaluation items, of always answering the most
frequent training answer of the item's task (read from the training shards named in the
run's saved config): the accuracy a model gets without looking at the image or the question's
details. A blind arm (`VisionEncoder.blank_images`) measures the rest of chance.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from experiments.contrasts import Contrast, judge, paired

PRIOR_ROW = "answer prior"


def last_predictions(run_dir: Path) -> Path | None:
    """The run's last validation answers (the ones its metrics.json reports), None without any."""
    files = sorted((run_dir / "predictions").glob("val_step_*.jsonl"))
    return files[-1] if files else None


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@lru_cache(maxsize=None)
def _metric(name: str):
    from casa.train.metrics import METRICS

    return METRICS[name]()  # the validation's defaults (tolerance, threshold)


def score(metric: str, prediction: str, record: dict[str, Any]) -> float | None:
    """`prediction` scored against an answers record's references, as validation scores it."""
    return _metric(metric).score(prediction, record.get("answers") or record["reference"], record.get("choices"))


def item_scores(run_dir: Path, metric: str) -> dict[str, tuple[str, float]]:
    """{item key: (its group, its score)} of a run's last validation ({} without predictions)."""
    path = last_predictions(run_dir)
    return {} if path is None else file_scores(path, metric)


def file_scores(path: Path, metric: str) -> dict[str, tuple[str, float]]:
    """{item key: (its group, its score)} of a predictions JSONL (a run's, or `experiments.evaluate
    --predictions`)."""
    out = {}
    for r in _records(path):
        s = score(metric, r["prediction"], r)
        if s is not None:
            out[str(r["key"])] = (r.get("group", "all"), float(s))
    return out


def arm_scores(results, grid, metric: str) -> dict[str, dict[str, dict[str, tuple[str, float]]]]:
    """{arm: {seed label: {item: (group, score)}}} of the finished runs."""
    arms: dict[str, dict[str, dict]] = {a: {} for a in grid.arms()}
    for r in results:
        if r.status not in ("finished", "skipped"):
            continue
        arm = "-".join(label for axis, label in r.run.labels.items() if axis != grid.aggregate) or "all"
        seed = r.run.labels.get(grid.aggregate, "-") if grid.aggregate else "-"
        scores = item_scores(r.run_dir, metric)
        if scores:
            arms[arm][seed] = scores
    return arms


def grid_contrasts(results, grid, metric: str) -> list[Contrast]:
    """The declared contrasts with data on both sides, judged as one family (avg quantity)."""
    arms = arm_scores(results, grid, metric)
    family = []
    for a, b in grid.contrasts:
        diff, seeds, items = paired(*({s: {k: v for k, (_, v) in scores.items()} for s, scores in arms[x].items()}
                                      for x in (a, b)))
        if not items:
            continue
        groups = arms[a][seeds[0]]
        family.append((a, b, "avg", diff, [groups[k][0] for k in items]))
    margin = None if grid.margin is None else grid.margin / 100
    return judge(family, margin)


CONTRAST_HEADER = ["contrast", "seeds", "items", "difference", "95% CI", "MDD (80%)", "p (Holm)", "verdict"]


def contrast_rows(contrasts: list[Contrast]) -> list[list[str]]:
    """The contrasts table's rows, in points."""
    return [[f"{c.a} − {c.b}", str(c.estimate.seeds), str(c.estimate.items), f"{100 * c.estimate.diff:+.1f}",
             f"[{100 * c.estimate.ci[0]:+.1f}, {100 * c.estimate.ci[1]:+.1f}]", f"{100 * c.estimate.mdd:.1f}",
             f"{c.p_adjusted:.3g}", c.verdict] for c in contrasts]


def write_contrasts_csv(contrasts: list[Contrast], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "quantity", "seeds", "items", "difference", "ci_low", "ci_high", "se", "df", "mdd",
                    "p", "p_holm", "verdict"])
        for c in contrasts:
            e = c.estimate
            w.writerow([c.a, c.b, c.quantity, e.seeds, e.items, e.diff, e.ci[0], e.ci[1], e.se, e.df, e.mdd, e.p,
                        c.p_adjusted, c.verdict])


# ---------------------------------------------------------------------------- answer prior
def _train_pattern(run_dir: Path) -> str | None:
    """The training shards of a run, from the config fit saved in its run dir."""
    for path in sorted(run_dir.rglob("config.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        train = ((cfg.get("data") or {}).get("init_args") or {}).get("train")
        if train:
            return train
    return None


def _last_answer(conv: dict[str, Any]) -> str | None:
    """The last assistant turn's text: the answer a training sample teaches (`data.format`)."""
    turns = [m for m in conv.get("messages", []) if m.get("role") == "assistant"]
    if not turns:
        return None
    return "".join(c.get("text", "") for c in turns[-1].get("content", []) if c.get("type") == "text")


@lru_cache(maxsize=8)
def training_modes(pattern: str) -> dict[str, str]:
    """{task: its most frequent training answer} over the training shards of `pattern` (the
    JSON of each sample only; images are not read). Ties go to the answer seen first."""
    from data.datamodule import expand_shards

    counts: dict[str, Counter] = {}
    for shard in expand_shards(pattern, "train"):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                conv = json.loads(tar.extractfile(member).read())
                answer = _last_answer(conv)
                if answer is not None:
                    counts.setdefault(conv.get("task", "unknown"), Counter())[answer] += 1
    return {task: c.most_common(1)[0][0] for task, c in counts.items()}


def answer_prior(results, metric: str) -> dict[str, float]:
    """{group: the answer prior's mean score over the group's evaluation items}, from the
    first finished run with predictions and a saved config ({} without one)."""
    for r in results:
        if r.status not in ("finished", "skipped") or (path := last_predictions(r.run_dir)) is None:
            continue
        pattern = _train_pattern(r.run_dir)
        if pattern is None:
            continue
        try:
            modes = training_modes(pattern)
        except (OSError, ValueError, tarfile.TarError):  # shards moved or unreadable: no prior, not a crash
            return {}
        per_group: dict[str, list[float]] = {}
        for rec in _records(path):
            mode = modes.get(rec.get("task", "unknown"))
            s = None if mode is None else score(metric, mode, rec)
            if s is not None:
                per_group.setdefault(rec.get("group", "all"), []).append(float(s))
        return {g: float(np.mean(v)) for g, v in per_group.items()}
    return {}
