"""The paper's claims, judged on the protocol's grids (docs/reproduction.md).

    python -m experiments.claims [--grids runs/grids] [--table8 runs/protocol/table8] [--json] [--margin 2]
    python -m experiments.claims --simulate-null N [--seeds S] [--items I] [--json]

Reads the finished runs of `protocol_table6a`, `protocol_table6b` and `protocol_table7` (each run's
metrics.json and its last validation answers, as `experiments.grid` leaves them) and Table 8's
evaluations: one `experiments.evaluate --json` output per seed and mask,
`casa_plus-s<N>-<mask>.json`, of protocol_table6a's CASA⊕ checkpoints, with the per-item answers
beside it (`--predictions casa_plus-s<N>-<mask>.jsonl`) when they were kept.

Every comparison is a paired contrast (`experiments.contrasts`): the paper's better side minus
the other, paired by seed label and by evaluation item (by seed alone where a quantity has one
value per run: perplexities, losses, or runs without per-item answers). Each row prints the
effect, its 95% CI, the minimum detectable difference at 80% power and the verdict, with Holm's
correction over the whole table: "holds" (the paper's direction), "reversed", "equivalent"
(accuracy CI within ±margin points) or "inconclusive".

`--simulate-null N` runs this same rule on N simulated sets of grids in which no arm differs from
any other (per-seed random effects, per-item random effects and binary outcomes, at the
protocol's numbers of seeds and items) and prints the rate of false verdicts (holds or reversed)
and the share of simulated tables with at least one (the familywise error rate).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.contrasts import estimate, holm, paired, stratified_mean, verdict
from experiments.grid import mean_group_score, previous
from experiments.grid_spec import load_grid
from experiments.grid_stats import file_scores, item_scores

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ROOT / "experiments" / "grids"
GROUPS = ("coarse", "fine", "read", "text")  # the protocol's task groups (docs/reproduction.md)
TASKS = {"color": "coarse", "count": "coarse", "spot_color": "fine", "read_number": "read", "arithmetic": "text"}
METRIC = "relaxed_accuracy"
MASKS = ("none", "self", "rnd", "rnd_txt")
ITEMS_PER_TASK = 60  # the protocol's validation split (docs/reproduction.md, "evaluation")


@dataclass
class RunData:
    """One finished run: its seed label, its per-item scores {key: (group, score)} and metrics."""

    seed: str
    metrics: dict[str, float]
    items: dict[str, tuple[str, float]] = field(default_factory=dict)


Runs = dict[str, list[RunData]]  # arm -> its runs, one per seed


def accuracy(metrics: dict[str, float], group: str | None = None) -> float | None:
    """A run's relaxed accuracy on one group, or (group None) its mean over the groups it has:
    the grids' "avg" column."""
    if group is not None:
        return metrics.get(f"val_group/{group}/{METRIC}")
    return mean_group_score(metrics, GROUPS, METRIC)


def grid_runs(name: str, grids: Path) -> Runs:
    """The finished runs of grid `name` (experiments/grids/<name>.yaml, run dirs under
    grids/<name>) -> {its labels on every axis but the seed, "-"-joined: [RunData per seed]}."""
    grid = load_grid(GRIDS / f"{name}.yaml")
    runs: Runs = {}
    for run in grid.runs():
        key = "-".join(label for axis, label in run.labels.items() if axis != grid.aggregate)
        result = previous(run, grids / name / run.name)
        runs.setdefault(key, [])
        if result is not None:
            runs[key].append(RunData(run.labels.get(grid.aggregate, "-"), result.metrics,
                                     item_scores(result.run_dir, METRIC)))
    return runs


def table8_runs(folder: Path) -> Runs:
    """{mask: [RunData per seed]} from the evaluations' JSON (and JSONL answers when kept)."""
    runs: Runs = {m: [] for m in MASKS}
    for path in sorted(folder.glob("casa_plus-s*-*.json")):
        _, seed, mask = path.stem.split("-", 2)
        if mask not in runs:
            continue
        out = json.loads(path.read_text())
        metrics = {f"val_group/{g}/{k}": v for g, scores in out["groups"].items() for k, v in scores.items()}
        metrics["answer_loss"] = out["loss"]["answer_loss"]
        answers = path.with_suffix(".jsonl")
        runs[mask].append(RunData(seed, metrics, file_scores(answers, METRIC) if answers.is_file() else {}))
    return runs


# ---------------------------------------------------------------------------- one comparison
@dataclass(frozen=True)
class Quantity:
    """What a comparison measures: accuracy on a group (None: the avg over GROUPS), or a metric."""

    label: str
    group: str | None = None
    metric: str | None = None  # a per-run metric (val_ppl/..., answer_loss) instead of accuracy
    higher_is_better: bool = True
    scale: float = 100.0  # printed in points (accuracy) or as is


def _values(runs: list[RunData], q: Quantity, per_item: bool) -> dict[str, dict[str, tuple[str, float]]]:
    """{seed: {item: (stratum, value)}}: the items of q's groups, or one value per seed."""
    out = {}
    for r in runs:
        if per_item:
            out[r.seed] = {k: (g, s) for k, (g, s) in r.items.items() if (g == q.group if q.group else g in GROUPS)}
        else:
            v = r.metrics.get(q.metric) if q.metric else accuracy(r.metrics, q.group)
            if v is not None:
                out[r.seed] = {"run": ("all", v)}
    return {s: v for s, v in out.items() if v}


def contrast_data(better: list[RunData], worse: list[RunData], q: Quantity):
    """-> (diff [S, I] in the paper's direction, strata, means of both sides) or None without
    data on both sides. Per item when every run of both sides has per-item scores."""
    per_item = q.metric is None and all(r.items for r in better + worse)
    a, b = _values(better, q, per_item), _values(worse, q, per_item)
    diff, seeds, items = paired(*({s: {k: v for k, (_, v) in d.items()} for s, d in x.items()} for x in (a, b)))
    if not items:
        return None
    strata = [a[seeds[0]][k][0] for k in items]
    sign = 1.0 if q.higher_is_better else -1.0
    means = [stratified_mean(np.array([[x[s][k][1] for k in items] for s in seeds]), strata) for x in (a, b)]
    return sign * diff, strata, means


@dataclass
class Claim:
    claim: str
    quantity: Quantity
    better: str
    worse: str
    data: tuple  # contrast_data's


def comparisons(t6: Runs, t6b: Runs, t7: Runs, t8: Runs) -> list[Claim]:
    """Every comparison of the claims table with data on both sides, in the table's order."""
    out: list[Claim] = []

    def compare(claim, q, grid, better, worse):
        data = contrast_data(grid.get(better, []), grid.get(worse, []), q)
        if data is not None:
            out.append(Claim(claim, q, better, worse, data))

    avg = Quantity("avg accuracy (%)")
    # 1. Table 2/6a: insertion > CASA > CA, CASA closing most of the gap
    claim = "CASA closes most of the gap to insertion"
    compare(claim, avg, t6, "insertion", "cross_attention")
    for casa in ("casa_plus", "casa_before", "casa_replace"):
        compare(claim, avg, t6, casa, "cross_attention")
        compare(claim, avg, t6, "insertion", casa)
    # 2. Table 6a: CASA beats CA where detail matters
    for group in ("read", "fine"):
        for casa in ("casa_plus", "casa_before"):
            for ca in ("cross_attention", "gated_cross_attention"):
                compare("CASA > CA on reading / high resolution", Quantity(f"{group} accuracy (%)", group), t6, casa, ca)
    # Table 6b: compressing the images (Q-Former) loses what insertion keeps, most where detail matters
    for group in (None, "fine", "read"):
        for qf in ("qformer_q2", "qformer_q4"):
            compare("insertion > Q-Former (Table 6b)", Quantity(f"{group or 'avg'} accuracy (%)", group), t6b,
                    "insertion", qf)
    # 3. Table 7: CASA∨ layers spread uniformly beat the same number bunched together
    t7 = dict(t7)
    if not t7.get("every_k-k4"):  # blocks 0 and 4: the very runs of Table 6a's casa_replace
        t7["every_k-k4"] = t6.get("casa_replace", [])
    claim = "CASA∨ is best spread uniformly"
    compare(claim, Quantity("avg accuracy (%), 2 CASA∨ layers"), t7, "every_k-k4", "first_k-k2")
    for other in ("first_k-k4", "first_last_k-k2"):
        compare(claim, Quantity("avg accuracy (%), 4 CASA∨ layers"), t7, "every_k-k2", other)
    # 4. Table 8: masking the self term hurts most
    claim = "masking *self* hurts most"
    for other in ("rnd", "rnd_txt"):
        compare(claim, Quantity("avg accuracy (%) under the mask"), t8, other, "self")
        compare(claim, Quantity("answer loss under the mask (not pre-registered)", metric="answer_loss",
                                higher_is_better=False, scale=1.0), t8, other, "self")
    # 5. App. A: the self term gates; ungated CA updates every text token after an image
    claim = "text ability kept better by CASA than by ungated CA"
    for task in ("describe_after_image", "describe"):
        q = Quantity(f"val_ppl/{task} (lower is better)", metric=f"val_ppl/{task}", higher_is_better=False, scale=1.0)
        for casa in ("casa_plus", "casa_before", "casa_replace"):
            compare(claim, q, t6, casa, "cross_attention")
    return out


def judge_claims(claims: list[Claim], margin: float = 2.0, alpha: float = 0.05) -> list[dict]:
    """Every comparison's effect, 95% CI, MDD and verdict; Holm over the whole table. `margin`
    (accuracy points) makes "equivalent" possible for accuracy rows; metric rows have none."""
    estimates = [estimate(c.data[0], c.data[1], alpha) for c in claims]
    adjusted = holm([e.p for e in estimates])
    rows = []
    for c, e, p in zip(claims, estimates, adjusted):
        q = c.quantity
        m = None if q.metric else margin / 100
        rows.append({"claim": c.claim, "quantity": q.label, "better": c.better, "worse": c.worse,
                     "better_mean": q.scale * c.data[2][0], "worse_mean": q.scale * c.data[2][1],
                     "seeds": e.seeds, "items": e.items, "effect": q.scale * e.diff,
                     "ci": [q.scale * e.ci[0], q.scale * e.ci[1]], "mdd": q.scale * e.mdd, "p": e.p, "p_holm": p,
                     "verdict": verdict(e, p, m, alpha)})
    return rows


def rows(grids: Path, table8: Path, margin: float = 2.0) -> list[dict]:
    """The judged claims table of the protocol's run dirs."""
    return judge_claims(comparisons(grid_runs("protocol_table6a", grids), grid_runs("protocol_table6b", grids),
                                    grid_runs("protocol_table7", grids), table8_runs(table8)), margin)


def gap_closed(grids: Path) -> dict[str, float]:
    """(CASA − CA) / (insertion − CA) on mean avg accuracy, per CASA variant; empty when
    insertion is not above CA (no gap to close)."""
    t6 = grid_runs("protocol_table6a", grids)
    means = {k: statistics.mean(v) for k, runs in t6.items()
             if (v := [a for r in runs if (a := accuracy(r.metrics)) is not None])}
    if not {"insertion", "cross_attention"} <= set(means):
        return {}
    gap = means["insertion"] - means["cross_attention"]
    if gap <= 0:
        return {}
    return {k: (means[k] - means["cross_attention"]) / gap for k in ("casa_plus", "casa_before", "casa_replace")
            if k in means}


# ---------------------------------------------------------------------------- the null
ARMS = {"t6": ("casa_plus", "casa_before", "casa_replace", "cross_attention", "gated_cross_attention", "insertion"),
        "t6b": ("qformer_q2", "qformer_q4", "insertion"),
        "t7": tuple(f"{p}-{k}" for p in ("every_k", "first_k", "first_last_k") for k in ("k2", "k4")),
        "t8": MASKS}


def null_grids(rng: np.random.Generator, seeds: int, items: int, seed_sd: float = 0.3, item_arm_sd: float = 0.5
               ) -> dict[str, Runs]:
    """One simulated set of the protocol's grids where no arm differs from another in
    expectation. An item's correctness is Bernoulli(sigmoid(difficulty_i + item x arm_i +
    seed x arm_s)): items share a difficulty (N(0, 1) logits around a task level), each arm
    finds some items easier than others do (item_arm_sd, mean 0) and each training run
    lands higher or lower (seed_sd, the training randomness). Per-run metrics (perplexities,
    answer loss) draw one value per run from one distribution."""
    keys = [(f"{task}-{i:04d}", group) for task, group in TASKS.items() for i in range(items)]
    level = {t: rng.normal(0, 1) for t in TASKS}
    difficulty = np.array([level[k.split("-")[0]] + rng.normal(0, 1) for k, _ in keys])  # [I]
    out = {}
    for name, arms in ARMS.items():
        grid: Runs = {}
        for arm in arms:
            bias = difficulty + rng.normal(0, item_arm_sd, len(keys))  # [I]
            grid[arm] = []
            for s in range(seeds):
                right = rng.random(len(keys)) < 1 / (1 + np.exp(-(bias + rng.normal(0, seed_sd))))  # [I]
                metrics = {"val_ppl/describe": float(np.exp(rng.normal(0.3, 0.05))),
                           "val_ppl/describe_after_image": float(np.exp(rng.normal(0.4, 0.05))),
                           "answer_loss": float(rng.normal(0.5, 0.02))}
                grid[arm].append(RunData(f"s{s}", metrics, {k: (g, float(r)) for (k, g), r in zip(keys, right)}))
        out[name] = grid
    return out


def simulate_null(n: int, seeds: int, items: int, margin: float = 2.0, rng_seed: int = 0, seed_sd: float = 0.3,
                  item_arm_sd: float = 0.5) -> dict:
    """The claims rule on `n` simulated null tables -> false verdict rate and familywise rate."""
    rng = np.random.default_rng(rng_seed)
    false, tables_with, total = 0, 0, 0
    for _ in range(n):
        g = null_grids(rng, seeds, items, seed_sd, item_arm_sd)
        verdicts = [r["verdict"] for r in judge_claims(comparisons(g["t6"], g["t6b"], g["t7"], g["t8"]), margin)]
        wrong = sum(v in ("holds", "reversed") for v in verdicts)
        false, tables_with, total = false + wrong, tables_with + (wrong > 0), total + len(verdicts)
    return {"false_verdict_rate": false / total, "familywise": tables_with / n, "tables": n,
            "comparisons_per_table": total // n, "seeds": seeds, "items_per_task": items, "tasks": len(TASKS)}


def protocol_seeds() -> int:
    """The number of seeds of the protocol's Table 6a grid (its `aggregate` axis)."""
    grid = load_grid(GRIDS / "protocol_table6a.yaml")
    return next(len(values) for name, values in grid.axes if name == grid.aggregate)


# ---------------------------------------------------------------------------- command line
def _markdown(table: list[dict]) -> list[str]:
    lines = ["| claim | quantity | paper's better side vs the other (means) | seeds x items | effect | 95% CI | "
             "MDD (80%) | p (Holm) | verdict |", "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in table:
        d = 1 if "accuracy" in r["quantity"] else 3
        lines.append(f"| {r['claim']} | {r['quantity']} | {r['better']} {r['better_mean']:.{d}f} vs {r['worse']} "
                     f"{r['worse_mean']:.{d}f} | {r['seeds']} x {r['items']} | {r['effect']:+.{d}f} | "
                     f"[{r['ci'][0]:+.{d}f}, {r['ci'][1]:+.{d}f}] | {r['mdd']:.{d}f} | {r['p_holm']:.3g} | "
                     f"{r['verdict']} |")
    return lines


def main(argv: list[str] | None = None) -> list[dict] | dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", default="runs/grids", help="the grids' output root (default runs/grids)")
    parser.add_argument("--table8", default="runs/protocol/table8",
                        help="folder of Table 8's evaluation JSONs (casa_plus-s<N>-<mask>.json)")
    parser.add_argument("--margin", type=float, default=2.0, help="equivalence margin of accuracy rows, in points")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    parser.add_argument("--simulate-null", type=int, metavar="N", help="run the rule on N simulated null tables")
    parser.add_argument("--seeds", type=int, help="seeds per arm of the simulation (default: the protocol's)")
    parser.add_argument("--items", type=int, default=ITEMS_PER_TASK,
                        help=f"evaluation items per task of the simulation (default {ITEMS_PER_TASK}, the protocol's)")
    args = parser.parse_args(argv)
    if args.margin <= 0:
        parser.error(f"--margin: {args.margin} must be > 0 points")
    if args.simulate_null is not None:
        seeds = args.seeds if args.seeds is not None else protocol_seeds()
        for name, value, low in (("--simulate-null", args.simulate_null, 1), ("--seeds", seeds, 2),
                                 ("--items", args.items, 2)):
            if value < low:
                parser.error(f"{name}: {value} must be >= {low}")
        result = simulate_null(args.simulate_null, seeds, args.items, args.margin)
        print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
        return result
    table = rows(Path(args.grids), Path(args.table8), args.margin)
    if not table:
        parser.error(f"no comparison has finished runs on both sides under {args.grids} (python -m "
                     "experiments.grid experiments/grids/protocol_table6a.yaml first)")
    closed = gap_closed(Path(args.grids))
    if args.json:
        def finite(x):  # JSON has no inf/NaN (an unreplicated contrast's CI): null instead
            if isinstance(x, dict):
                return {k: finite(v) for k, v in x.items()}
            if isinstance(x, list):
                return [finite(v) for v in x]
            return None if isinstance(x, float) and not math.isfinite(x) else x

        print(json.dumps(finite({"claims": table, "gap_closed": closed}), indent=1))
        return table
    print("\n".join(_markdown(table)))
    print(f"\nPaired by seed and item; Holm over the {len(table)} rows; equivalence margin ±{args.margin:g} points "
          "(accuracy rows). Docs: docs/grids.md, Contrasts.")
    if closed:
        print("\nShare of the CA → insertion gap closed (avg accuracy means): "
              + ", ".join(f"{k} {v:.2f}" for k, v in closed.items()))
    else:
        print("\nNo share of the CA → insertion gap: insertion's mean avg accuracy is not above CA's.")
    return table


if __name__ == "__main__":
    main()
