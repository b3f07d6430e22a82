"""experiments.grid: a tiny 2x1 grid end to end (tables, skip on re-run, a failing run),
the shipped grids expanded and parsed by the real fit CLI, and grid-file validation.

Real runs are subprocesses of `experiments.fit` (~15-25 s each, mostly imports): the module
fixture runs the 2x1 grid once and the failure test adds one run that fails at build time.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from experiments import strategies
from experiments.grid import GridError, Result, load_grid, main, plot_series, run_grid, write_plot, write_results

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ROOT / "experiments" / "grids"
TINY = ["experiments/configs/demo.yaml", "tests/configs/tiny.yaml"]
STRATEGY = "experiments/configs/strategies/{}.yaml"

# the combinations each shipped grid must expand to, in order (first axis slowest)
EXPECTED = {
    "table6a": ["casa_plus", "casa_before", "casa_replace", "cross_attention", "gated_cross_attention",
                "insertion", "qformer"],
    "table7": ["every_k-k2", "every_k-k4", "first_k-k2", "first_k-k4", "first_last_k-k2", "first_last_k-k4"],
    "table6a_seeds": [f"{f}-s{i}" for f in ("casa_plus", "cross_attention", "insertion") for i in range(3)],
    "strategies": strategies.names(),  # `strategies: all`: the whole matrix, a new YAML included
    # the protocol's grids (docs/reproduction.md), three seeds each
    "protocol_table6a": [f"{f}-s{i}" for f in ("casa_plus", "casa_before", "casa_replace", "cross_attention",
                                               "gated_cross_attention", "insertion") for i in range(3)],
    "protocol_table6b": [f"{f}-s{i}" for f in ("qformer_q2", "qformer_q4", "insertion") for i in range(3)],
    "protocol_table7": [f"{p}-{k}-s{i}" for p in ("every_k", "first_k", "first_last_k") for k in ("k2", "k4")
                        for i in range(3)],
    "protocol_table8": [f"{m}-s{i}" for m in ("none", "self", "rnd", "rnd_txt") for i in range(3)],
    # protocol v2's grids (docs/reproduction.md, "Protocol v2"), five seeds each
    "protocol_v2_pilot": [f"st{n}-s{i}" for n in (500, 1000, 1500) for i in range(2)],
    "protocol_v2_table6a": [f"{f}-s{i}" for f in ("insertion", "cross_attention", "casa_plus") for i in range(5)],
    "protocol_v2_table6a_more": [f"{f}-s{i}" for f in ("gated_cross_attention", "casa_before", "casa_replace")
                                 for i in range(5)],
    "protocol_v2_new": [f"{f}-s{i}" for f in ("casa_previous", "perceiver_gated_cross_attention") for i in range(5)],
    "protocol_v2_table6b": [f"{f}-s{i}" for f in ("qformer_q4", "qformer_q16", "insertion") for i in range(5)],
    "protocol_v2_table7": [f"{p}-s{i}" for p in ("every_k.k4", "first_k.k2") for i in range(5)],
    "protocol_v2_table7_four": [f"{p}-s{i}" for p in ("every_k.k2", "first_k.k4", "first_last_k.k2") for i in range(5)],
}
TINY_GRID = ROOT / "tests" / "configs" / "tiny_grid.yaml"  # 2x1: casa_plus, casa_replace x 2 steps
TINY_GRID_2X2 = ROOT / "tests" / "configs" / "tiny_grid_2x2.yaml"  # x seeds s0, s1
# k=0: no block to fuse (CASA.k must be >= 1): experiments.fit fails while building the model
BROKEN = {"label": "broken", "configs": [STRATEGY.format("casa_replace")],
          "overrides": {"model.model.init_args.fusion.init_args.k": 0}}


def run(grid: Path, out: Path, **kw):
    """run_grid with its terminal output captured; returns (results, output text)."""
    buf = io.StringIO()
    results = run_grid(load_grid(grid), out, console=Console(file=buf, width=120), **kw)
    return results, buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The 2x1 grid, run once: (grid file, out dir, results, output)."""
    out = tmp_path_factory.mktemp("grid") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # config paths and the tiny synth directory are relative to the repository
        results, output = run(TINY_GRID, out)
    return TINY_GRID, out, results, output


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_tiny_grid_runs_every_combination_and_writes_tables(tiny):
    _, out, results, output = tiny
    assert [(r.run.name, r.status) for r in results] == [
        ("casa_plus-s2", "finished"), ("casa_replace-s2", "finished")], output
    for r in results:
        assert "validation after 2 steps" in r.log.read_text()
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["casa_plus-s2", "casa_replace-s2"]
    for row in rows:
        assert row["fusion"] in ("casa_plus", "casa_replace") and row["steps"] == "s2"
        assert row["global_step"] == "2"
        for group in ("coarse", "video"):  # the tiny synth's groups
            assert 0.0 <= float(row[f"val_group/{group}/relaxed_accuracy"]) <= 1.0
        assert float(row["val/loss"]) > 0
        assert float(row["peak_memory_bytes"]) > 2 ** 20 and float(row["step_time_s"]) > 0
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = ["run", "status", "val/loss", "coarse", "video", "avg", "mem (MiB)", "step (s)"]
    assert [h.strip() for h in table[0].split("|")[1:-1]] == header
    # the runs, then chance: the answer prior from the tiny synth's training answers
    assert [line.split("|")[1].strip() for line in table[2:]] == ["casa_plus-s2", "casa_replace-s2", "answer prior"]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG" and str(out / "results.png") in output


def test_rerun_skips_finished_runs(tiny, at_root):
    grid, out, first, _ = tiny
    start = time.monotonic()
    results, output = run(grid, out)
    assert time.monotonic() - start < 10  # no subprocess started
    assert [r.status for r in results] == ["skipped", "skipped"], output
    assert output.count("skipped (finished earlier)") == 2
    assert [r.metrics["val/loss"] for r in results] == [r.metrics["val/loss"] for r in first]
    with open(out / "results.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["skipped", "skipped"]
    # with --only, the tables still cover the whole grid
    results, _ = run(grid, out, only=["casa_r*"])
    assert [r.run.name for r in results] == ["casa_replace-s2"]
    with open(out / "results.csv", newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["casa_plus-s2", "casa_replace-s2"]


def test_failed_run_is_recorded_and_the_grid_goes_on(tiny, at_root):
    _, out, _, _ = tiny
    grid = out.parent / "with_broken.yaml"
    spec = yaml.safe_load(TINY_GRID.read_text())
    spec["axes"][0]["values"].insert(0, BROKEN)  # the failing run comes first
    grid.write_text(yaml.safe_dump(spec))
    results, output = run(grid, out)
    assert [(r.run.name, r.status) for r in results] == [
        ("broken-s2", "failed"), ("casa_plus-s2", "skipped"), ("casa_replace-s2", "skipped")], output
    broken = results[0]
    assert broken.exit_code != 0 and "CASA.k=0" in broken.log.read_text()
    assert f"log: {broken.log}" in output.replace("\n", "")
    with open(out / "results.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["broken-s2"]["status"] == "failed" and rows["broken-s2"]["log"] == str(broken.log)
    assert rows["casa_plus-s2"]["val/loss"]
    assert f"`broken-s2`: exit code {broken.exit_code}, log `{broken.log}`" in (out / "results.md").read_text()


def test_run_arguments_put_configs_first_and_specific_overrides_last(tmp_path, at_root):
    r = load_grid(TINY_GRID).runs()[1]
    assert r.args(tmp_path / "x") == [
        "--config", TINY[0], "--config", TINY[1], "--config", STRATEGY.format("casa_replace"),
        "--trainer.enable_model_summary", "false", "--trainer.max_steps", "2", "--run_dir", str(tmp_path / "x")]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_grids_expand_and_parse_with_fit(name, tmp_path, at_root, capsys, monkeypatch):
    assert sorted(p.stem for p in GRIDS.glob("*.yaml")) == sorted(EXPECTED)
    results = main([str(GRIDS / f"{name}.yaml"), "--dry-run", "--out", str(tmp_path)])
    assert [r.run.name for r in results] == EXPECTED[name]
    assert {r.status for r in results} == {"pending"} and not any(tmp_path.iterdir())
    for r in results:
        assert all(Path(c).is_file() for c in r.run.configs)
    # every combination's arguments go through the real fit parser (no model is built)
    from experiments.fit import main as fit

    monkeypatch.setattr("sys.argv", ["experiments.fit"])  # pytest's own arguments are not fit's
    for r in results:
        with pytest.raises(SystemExit) as e:
            fit(r.run.args(tmp_path / r.run.name) + ["--print_config"])
        assert e.value.code in (0, None), capsys.readouterr().err


def test_the_blind_arm_reaches_the_vision_tower_through_fit(tmp_path, at_root, capsys, monkeypatch):
    """tests/configs/tiny_grid_contrasts.yaml: its `blind` arm's override is a real VisionEncoder
    argument (`blank_images`), the seeing arms leave it off, and its contrasts name its arms."""
    import yaml as _yaml

    from experiments.fit import main as fit

    grid = load_grid(ROOT / "tests" / "configs" / "tiny_grid_contrasts.yaml")
    assert grid.contrasts == [("casa_plus", "blind"), ("insertion", "blind"), ("casa_plus", "insertion")]
    monkeypatch.setattr("sys.argv", ["experiments.fit"])
    blank = {}
    for run in [r for r in grid.runs() if r.labels["seed"] == "s0"]:
        with pytest.raises(SystemExit):
            fit(run.args(tmp_path / run.name) + ["--print_config"])
        config = _yaml.safe_load(capsys.readouterr().out)
        blank[run.labels["fusion"]] = config["model"]["model"]["init_args"]["vision"]["init_args"]["blank_images"]
    assert blank == {"casa_plus": False, "insertion": False, "blind": True}


def test_only_selects_runs_by_name_or_pattern(at_root, tmp_path):
    grid = GRIDS / "table7.yaml"
    results = main([str(grid), "--dry-run", "--out", str(tmp_path), "--only", "first_*", "every_k-k4"])
    assert [r.run.name for r in results] == ["every_k-k4", "first_k-k2", "first_k-k4", "first_last_k-k2", "first_last_k-k4"]
    with pytest.raises(GridError, match=r"--only: 'every-k2' matches no run; runs: \['every_k-k2'"):
        run_grid(load_grid(grid), tmp_path, only=["every-k2"], dry_run=True, console=Console(file=io.StringIO()))


GOOD_VALUE = f"{{label: a, configs: [{STRATEGY.format('casa_plus')}]}}"


@pytest.mark.parametrize("text, message", [
    (f"base: {TINY}\naxis: []\n",
     r"unknown key\(s\) \['axis'\]; valid keys: \['description', 'base', 'overrides', 'axes', 'aggregate', 'compare', "
     r"'margin', 'slurm', 'wandb'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}, {{label: b}}]}}]\ncompare: {{baseline: c}}\n",
     r"compare\.baseline: 'c' is not an arm of this grid; arms: \['a', 'b'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}, {{label: b}}]}}]\ncompare: {{base: a}}\n",
     r"compare: unknown key\(s\) \['base'\]; valid keys: \['baseline'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}, {{label: b}}]}}]\ncompare: [[a, a]]\n",
     r"compare\[0\]: \['a', 'a'\] must be two different arms \[a, b\] \(a - b\); arms: \['a', 'b'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}, {{label: b}}]}}]\ncompare: [[a, z]]\n",
     r"compare\[0\]: \['z'\] not an arm of this grid; arms: \['a', 'b'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}, {{label: b}}]}}]\ncompare: [[a, b]]\nmargin: 0\n",
     r"margin: 0\.0 must be a positive number of points"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}, {{label: b}}]}}]\nmargin: 2\n",
     r"margin: 2\.0 is given but no `compare:` declares contrasts"),
    (f"base: {TINY}\naggregate: seed\naxes: [{{name: fusion, values: [{GOOD_VALUE}]}}]\n",
     r"aggregate: 'seed' is not an axis of this grid; axes: \['fusion'\]"),
    (f"base: {TINY}\n", r"missing key\(s\) \['axes'\]"),
    (f"base: {TINY}\naxes: []\n", r"axes: expected a non-empty list of \{name, values\}, got \[\]"),
    (f"base: {TINY}\naxes: [{{name: fusion, values: []}}]\n",
     r"axes\[0\]\.values: axis 'fusion' needs a non-empty list of \{label, configs, overrides\}, got \[\]"),
    (f"base: [experiments/configs/nope.yaml]\naxes: [{{name: f, values: [{GOOD_VALUE}]}}]\n",
     r"base: config file 'experiments/configs/nope.yaml' does not exist \(paths are relative to the working directory"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{{label: a, configs: [strategies/casa_plus.yaml]}}]}}]\n",
     r"axes\[0\]\.values\[0\]\.configs: config file 'strategies/casa_plus.yaml' does not exist"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}, {GOOD_VALUE}]}}]\n",
     r"axes\[0\]\.values\[1\]\.label: duplicate label 'a' in axis 'f'; labels so far: \['a'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}]}}, {{name: f, values: [{GOOD_VALUE}]}}]\n",
     r"axes\[1\]\.name: duplicate axis name 'f'; axes so far: \['f'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{{label: a, mode: plus}}]}}]\n",
     r"axes\[0\]\.values\[0\]: unknown key\(s\) \['mode'\]; valid keys: \['label', 'configs', 'overrides'\]"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{{label: a-b}}]}}]\n",
     r"axes\[0\]\.values\[0\]\.label: 'a-b' must be letters, digits"),
    (f"base: {TINY}\naxes: [{{name: f, strategies: [casa_pluss]}}]\n",
     r"Parser key \"axes\":(.|\n)*Parser key \"strategies\":(.|\n)*Expected a typing.Literal\['casa_before', "
     r"(.|\n)*Got value: casa_pluss"),
    (f"base: {TINY}\naxes: [{{name: f, strategies: plus}}]\n",
     r"Parser key \"strategies\":(.|\n)*Subtypes: \[typing.Literal\['all'\], list\[typing.Literal\['casa_before', "
     r"(.|\n)*Given value: plus"),
    (f"base: {TINY}\naxes: [{{name: f, strategies: []}}]\n",
     r"axes\[0\]\.strategies: expected 'all' or a non-empty list of strategy names from \['casa_before'"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{{label: a, configs: 3}}]}}]\n",
     r"Parser key \"configs\":(.|\n)*Given value: 3"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{{label: a, overrides: [1]}}]}}]\n",
     r"Parser key \"overrides\":(.|\n)*Expected a <class 'dict'>"),
    (f"base: {TINY}\naxes: {{name: f}}\n", r"Parser key \"axes\":(.|\n)*Expected a <class 'list'>"),
    (f"base: {TINY}\naxes: [{{name: f, values: [{GOOD_VALUE}]}}]\nwandb: {{mode: cloud}}\n",
     r"Parser key \"mode\":(.|\n)*Expected a typing.Literal\['online', 'offline'\]. Got value: cloud"),
    (f"base: {TINY}\naxes: [[]]\n", r"axes\[0\]: expected a mapping with keys \['name', 'values', 'strategies'\], got \[\]"),
    (f"base: {TINY}\naxes: [{{name: f, strategies: all, values: [{GOOD_VALUE}]}}]\n",
     r"axes\[0\]: axis 'f' needs exactly one of 'values' or 'strategies', got \['name', 'strategies', 'values'\]"),
    (f"base: {TINY}\naxes: [{{name: f}}]\n", r"axes\[0\]: axis 'f' needs exactly one of 'values' or 'strategies'"),
    (f"base: {TINY}\noverrides: {{run_dir: x}}\naxes: [{{name: f, values: [{GOOD_VALUE}]}}]\n",
     r"overrides: 'run_dir' cannot be overridden here: the grid sets it"),
    (f"base: {TINY}\noverrides: {{trainer.max_steps: 1, trainer.max_steps: 2}}\naxes: []\n",
     r"line 2: key\(s\) \['trainer.max_steps'\] given twice in one mapping"),
])
def test_malformed_grid_files_name_the_field_value_and_choices(text, message, tmp_path, at_root):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(GridError, match=message):
        load_grid(path)


def test_cli_reports_a_malformed_grid_in_one_line(tmp_path, at_root, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {TINY}\naxes: []\n")
    with pytest.raises(SystemExit) as e:
        main([str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(f"experiments.grid: error: {path}: axes: expected a non-empty list")
    assert "Traceback" not in err


def test_aggregate_axis_adds_mean_and_std_over_its_repeats(tmp_path, at_root):
    """`aggregate: seed`: per fusion value, mean ± sample std over its finished seeds (a
    failed seed is left out and counted), in results.md and results_mean.csv."""
    path = tmp_path / "seeds.yaml"
    path.write_text(f"base: {TINY}\naggregate: seed\naxes:\n"
                    f"  - {{name: fusion, values: [{GOOD_VALUE}, {{label: b}}]}}\n"
                    f"  - {{name: seed, values: [{{label: s0}}, {{label: s1}}, {{label: s2}}]}}\n")
    grid = load_grid(path)
    coarse = {"a-s0": 0.5, "a-s1": 0.6, "a-s2": 0.7, "b-s0": 0.2, "b-s1": 0.3, "b-s2": None}  # b-s2 failed
    results = []
    for run in grid.runs():
        score = coarse[run.name]
        summary = {} if score is None else {
            "metrics": {"val/loss": 1 - score, "val_group/coarse/relaxed_accuracy": score,
                        "val_group/video/relaxed_accuracy": score / 2, "val_ppl/describe": 1 + score,
                        "train/step_time_s": 0.1},
            "peak_memory_bytes": 100 * 2 ** 20}
        results.append(Result(run, "failed" if score is None else "finished", tmp_path / "runs" / run.name,
                              summary=summary))
    out = tmp_path / "out"
    write_results(results, grid, out, "relaxed_accuracy")
    md = (out / "results.md").read_text()
    mean_rows = md.split("Mean ± sample standard deviation over the axis `seed`")[1]
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in mean_rows.splitlines() if line.startswith("|")]
    assert table[0] == ["fusion", "n", "val/loss", "val_ppl/describe", "coarse", "video", "avg", "mem (MiB)", "step (s)"]
    assert table[2] == ["a", "3/3", "0.4000 ± 0.1000", "1.600 ± 0.100", "60.0 ± 10.0", "30.0 ± 5.0", "45.0 ± 7.5",
                        "100 ± 0", "0.100 ± 0.000"]
    assert table[3][:6] == ["b", "2/3", "0.7500 ± 0.0707", "1.250 ± 0.071", "25.0 ± 7.1", "12.5 ± 3.5"]
    with open(out / "results.csv", newline="") as f:  # the held-out perplexities reach the CSVs too
        assert [r["val_ppl/describe"] for r in csv.DictReader(f)] == ["1.5", "1.6", "1.7", "1.2", "1.3", ""]
    with open(out / "results_mean.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["fusion"], r["n"]) for r in rows] == [("a", "3"), ("b", "2")]
    assert float(rows[0]["val_group/coarse/relaxed_accuracy_mean"]) == pytest.approx(0.6)
    assert float(rows[0]["val_group/coarse/relaxed_accuracy_std"]) == pytest.approx(0.1)
    assert float(rows[1]["val/loss_std"]) == pytest.approx(0.0707107, rel=1e-4)
    assert float(rows[0]["val_ppl/describe_mean"]) == pytest.approx(1.6)
    # the plot: per group, mean ± std over the seeds of each fusion value
    names, series = plot_series(results, grid, "relaxed_accuracy")
    assert names == ["a", "b"] and list(series) == ["coarse", "video"]
    assert series["coarse"][0] == pytest.approx((0.6, 0.1)) and series["video"][1] == pytest.approx((0.125, 0.0353553), rel=1e-5)
    assert write_plot(results, grid, out, "relaxed_accuracy") == out / "results.png"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def _train_shard(folder: Path, answers: dict[str, list[str]]) -> None:
    """A training shard of JSON-only samples (`data.format`): task -> its answers."""
    import tarfile

    folder.mkdir(parents=True)
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for task, values in answers.items():
            for i, answer in enumerate(values):
                conv = {"task": task, "group": "g", "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "how many?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
                data = json.dumps(conv).encode()
                info = tarfile.TarInfo(f"{task}-{i:03d}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_declared_contrasts_are_paired_by_seed_and_item_beside_the_answer_prior(tmp_path, at_root):
    """`compare: {baseline: b}`: every other arm minus b, paired by seed label and item key,
    Holm over the family, in results.md and results_contrasts.csv; the answer prior's row."""
    from experiments.contrasts import estimate, holm

    path = tmp_path / "cmp.yaml"
    path.write_text(f"base: {TINY}\naggregate: seed\ncompare: {{baseline: b}}\nmargin: 2\naxes:\n"
                    f"  - {{name: fusion, values: [{GOOD_VALUE}, {{label: b}}, {{label: c}}]}}\n"
                    f"  - {{name: seed, values: [{{label: s0}}, {{label: s1}}, {{label: s2}}]}}\n")
    grid = load_grid(path)
    assert grid.contrasts == [("a", "b"), ("c", "b")] and grid.margin == 2
    _train_shard(tmp_path / "shards", {"count": ["3"] * 5 + ["4"] * 2, "color": ["red", "blue", "blue"]})
    rng = __import__("numpy").random.default_rng(0)
    # 40 count items (reference "3" or "4"; "3.1" is within 5% of "3") and 20 colour items
    refs = [("count", "count", str(3 + i % 2)) for i in range(40)] + [("color", "colour", "red") for _ in range(20)]
    refs[1] = ("count", "count", "3.1")  # was "4"
    p_right = {"a": 1.0, "b": 0.5, "c": 0.5}
    correct = {}
    results = []
    for run in grid.runs():
        fusion, seed = run.labels["fusion"], run.labels["seed"]
        run_dir = tmp_path / "runs" / run.name
        (run_dir / "predictions").mkdir(parents=True)
        (run_dir / "tb").mkdir()
        (run_dir / "tb" / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"train": str(tmp_path / "shards")}}}))
        right = rng.random(len(refs)) < p_right[fusion]
        correct[(fusion, seed)] = right.astype(float)
        # the items in another order per run, and an earlier validation's file that must not be read
        order = rng.permutation(len(refs))
        (run_dir / "predictions" / "val_step_000001.jsonl").write_text("")
        (run_dir / "predictions" / "val_step_000002.jsonl").write_text("".join(
            json.dumps({"key": f"k{i:03d}", "task": refs[i][0], "group": refs[i][1],
                        "prediction": refs[i][2] if right[i] else "wrong", "reference": refs[i][2]}) + "\n"
            for i in order))
        metrics = {f"val_group/{g}/relaxed_accuracy": right[[i for i, r in enumerate(refs) if r[1] == g]].mean()
                   for g in ("count", "colour")}
        results.append(Result(run, "finished", run_dir, summary={"metrics": {"val/loss": 1.0, **metrics}}))
    out = tmp_path / "out"
    write_results(results, grid, out, "relaxed_accuracy")
    md = (out / "results.md").read_text()

    strata = [g for _, g, _ in refs]
    expected = [estimate([correct[(x, s)] - correct[("b", s)] for s in ("s0", "s1", "s2")], strata) for x in "ac"]
    adjusted = holm([e.p for e in expected])
    with open(out / "results_contrasts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"], r["seeds"], r["items"]) for r in rows] == [("a", "b", "3", "60"), ("c", "b", "3", "60")]
    for row, e, p in zip(rows, expected, adjusted):
        assert float(row["difference"]) == pytest.approx(e.diff) and float(row["ci_low"]) == pytest.approx(e.ci[0])
        assert float(row["mdd"]) == pytest.approx(e.mdd) and float(row["p_holm"]) == pytest.approx(p)
    assert rows[0]["verdict"] == "holds" and expected[0].diff > 0.4  # right on every item against half
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in md.split("Paired contrasts")[1].splitlines()
             if line.startswith("| a")]
    assert table[0][:4] == ["a − b", "3", "60", f"{100 * expected[0].diff:+.1f}"]
    assert table[0][-1] == "holds"
    # the answer prior: "3" for count (right on 20 of 40 items, and on "3.1"), "blue" for colour (never)
    prior = [[c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines() if line.startswith("| answer prior")]
    header = [c.strip() for c in md.split("Mean ± sample")[1].splitlines()[2].split("|")[1:-1]]
    assert len(prior) == 2  # under the per-run table and under the mean table
    assert dict(zip(header, prior[1]))["count"] == f"{100 * 21 / 40:.1f}"
    assert dict(zip(header, prior[1]))["colour"] == "0.0"
    assert dict(zip(header, prior[1]))["avg"] == f"{100 * 21 / 80:.1f}"

# ---------------------------------------------------------------------------- --jobs N
def _grid_2x2(path: Path, first: list[dict] = ()) -> Path:
    """tests/configs/tiny_grid_2x2.yaml (fusion casa_plus, casa_replace x seed s0, s1; 2 steps)
    with `first` values put before the fusion axis's two, written to `path`."""
    spec = yaml.safe_load(TINY_GRID_2X2.read_text())
    spec["axes"][0]["values"][:0] = list(first)
    path.write_text(yaml.safe_dump(spec))
    return path


# what differs between two executions of the same runs: wall and step time, memory, log path
UNSTABLE = ("seconds", "step_time_s", "peak_memory_bytes", "log", "status")


@pytest.fixture(scope="module")
def sequential_2x2(tmp_path_factory):
    """The 2x2 grid run sequentially, once: the reference of the parallel and submitit runs."""
    tmp = tmp_path_factory.mktemp("grid2x2")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        results, output = run(_grid_2x2(tmp / "seq.yaml"), tmp / "seq")
    assert [r.status for r in results] == ["finished"] * 4, output
    return tmp / "seq"


def _stable_rows(out: Path) -> dict[str, dict]:
    """results.csv by run, without what differs between executions of the same runs."""
    with open(out / "results.csv", newline="") as f:
        return {r["run"]: {k: v for k, v in r.items() if k not in UNSTABLE} for r in csv.DictReader(f)}


def test_parallel_grid_gives_the_sequential_results_and_a_failure_stops_no_other_run(sequential_2x2, tmp_path, at_root):
    """--jobs 2 on the 2x2 grid (plus two runs that fail at build time, first in line): the
    same results.csv as the sequential grid but for time, memory and log path."""
    parallel, output = run(_grid_2x2(tmp_path / "par.yaml", [BROKEN]), tmp_path / "par", jobs=2)
    assert [(r.run.name, r.status) for r in parallel] == [
        ("broken-s0", "failed"), ("broken-s1", "failed"), ("casa_plus-s0", "finished"), ("casa_plus-s1", "finished"),
        ("casa_replace-s0", "finished"), ("casa_replace-s1", "finished")], output
    assert "2 at once" in output and "CASA.k=0" in parallel[0].log.read_text()
    seq, par = _stable_rows(sequential_2x2), _stable_rows(tmp_path / "par")
    assert {k: par[k] for k in seq} == seq
    assert all(r["global_step"] == "2" and float(r["val/loss"]) > 0 for r in seq.values())


def test_submitit_local_executor_gives_the_sequential_results(sequential_2x2, tmp_path, at_root):
    """--launcher submitit-local: the job pickles `--launcher slurm` submits (FitJob), run by
    submitit's LocalExecutor as subprocesses: the sequential grid's results.csv."""
    results, output = run(_grid_2x2(tmp_path / "sub.yaml"), tmp_path / "sub", launcher="submitit-local")
    assert [r.status for r in results] == ["finished"] * 4, output
    assert "submitted 4 jobs" in output and any((tmp_path / "sub" / "submitit").glob("*_submitted.pkl"))
    assert _stable_rows(tmp_path / "sub") == _stable_rows(sequential_2x2)
    results, output = run(_grid_2x2(tmp_path / "sub.yaml"), tmp_path / "sub", launcher="submitit-local")
    assert [r.status for r in results] == ["skipped"] * 4 and "submitted" not in output


def test_slurm_dry_run_prints_the_sbatch_script(tmp_path, at_root, capsys):
    """--launcher slurm --dry-run: resources from the grid file's `slurm:`, overridden by the
    flags; multi-node runs get one task per GPU and fit the matching trainer arguments."""
    path = tmp_path / "slurm.yaml"
    spec = yaml.safe_load(TINY_GRID.read_text())
    spec["slurm"] = {"partition": "gpu", "account": "proj", "gpus_per_node": 4, "time": 240, "additional": {"qos": "high"}}
    path.write_text(yaml.safe_dump(spec))
    main([str(path), "--launcher", "slurm", "--dry-run", "--out", str(tmp_path / "out"), "--nodes", "2",
          "--partition", "h100"])
    text = capsys.readouterr().out
    for line in ("#SBATCH --partition=h100", "#SBATCH --account=proj", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --time=240", "#SBATCH --qos=high", "#SBATCH --signal=USR2@90",
                 "srun --unbuffered", "-m submitit.core._submit"):
        assert line in text, text
    assert text.count("--trainer.num_nodes 2 --trainer.devices 4") == 2
    assert not (tmp_path / "out").exists()


def test_slurm_section_of_a_grid_file_is_checked_by_the_schema(tmp_path, at_root):
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {TINY}\nslurm: {{partition: gpu, gpus: 4}}\naxes: [{{name: f, values: [{GOOD_VALUE}]}}]\n")
    with pytest.raises(GridError, match=r"slurm: unknown key\(s\) \['gpus'\]; valid keys: \['partition', 'account', "
                                        r"'nodes', 'gpus_per_node', 'cpus_per_task', 'time', 'additional'\]"):
        load_grid(path)
    path.write_text(f"base: {TINY}\nslurm: {{nodes: two}}\naxes: [{{name: f, values: [{GOOD_VALUE}]}}]\n")
    with pytest.raises(GridError, match=r"Parser key \"nodes\"(.|\n)*two"):
        load_grid(path)


FAKE_FIT = """\
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
run_dir = Path(args[args.index("--run_dir") + 1])
(run_dir / "argv.json").write_text(json.dumps(args))


def interrupted(*_):
    with open(run_dir / "interrupted", "a") as f:
        f.write("SIGINT\\n")
    sys.exit(130)


signal.signal(signal.SIGINT, interrupted)
(run_dir / "checkpoints").mkdir(exist_ok=True)
(run_dir / "checkpoints" / "last.ckpt").write_text("")  # as fit's ModelCheckpoint(save_last=True)
(run_dir / "started").write_text(os.environ.get("OMP_NUM_THREADS", ""))
if os.environ["FAKE_FIT"] == "hang":
    time.sleep(120)
(run_dir / "metrics.json").write_text(json.dumps({"finished": True, "global_step": 2, "metrics": {"val/loss": 1.0}}))
"""


def test_ctrl_c_stops_every_run_cleanly_and_a_rerun_resumes_them_from_last_ckpt(tmp_path, at_root, monkeypatch):
    """A stand-in for fit (FAKE_FIT) shows the process handling: --jobs 2 starts two runs,
    each with half the CPU threads; Ctrl-C interrupts each once (SIGINT) and starts no other;
    the re-run resumes the two with `--ckpt_path last` and starts the other two afresh."""
    import os
    import signal
    import sys
    import threading

    from experiments import grid as grid_module

    fake = tmp_path / "fake_fit.py"
    fake.write_text(FAKE_FIT)
    monkeypatch.setattr(grid_module, "FIT", [sys.executable, str(fake)])
    monkeypatch.setattr(grid_module.os, "sched_getaffinity", lambda _: set(range(8)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(grid_module, "_gpu_ids", lambda: [])  # this test is about the CPU split
    monkeypatch.setenv("FAKE_FIT", "hang")
    out, names = tmp_path / "out", ["a-s0", "a-s1", "b-s0", "b-s1"]
    path = tmp_path / "g.yaml"
    path.write_text(f"base: {TINY}\naxes:\n  - {{name: f, values: [{{label: a}}, {{label: b}}]}}\n"
                    f"  - {{name: s, values: [{{label: s0}}, {{label: s1}}]}}\n")

    def ctrl_c_when_two_run():
        deadline = time.monotonic() + 60
        while sum((out / n / "started").is_file() for n in names) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # as the terminal's Ctrl-C: to the grid's process

    # Ctrl-C as at a terminal, whatever handler an earlier test of this worker process left
    # (in a full xdist run the signal once went unanswered here and the hanging runs were waited for)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c_when_two_run, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run(path, out, jobs=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 60  # the hanging runs were stopped, not waited for
    assert [(out / n / "started").read_text() for n in names[:2]] == ["4", "4"]  # 8 cores / 2 jobs
    assert [(out / n / "interrupted").read_text() for n in names[:2]] == ["SIGINT\n"] * 2  # once each
    assert not any((out / n).exists() for n in names[2:])

    monkeypatch.setenv("FAKE_FIT", "finish")
    results, output = run(path, out, jobs=2)
    assert [r.status for r in results] == ["finished"] * 4, output
    argv = {n: json.loads((out / n / "argv.json").read_text()) for n in names}
    assert [argv[n][-2:] for n in names] == [["--ckpt_path", "last"]] * 2 + [["--run_dir", str(out / n)] for n in names[2:]]
    assert output.count("(resumed from last.ckpt)") == 2
    assert [json.loads((out / n / "grid_run.json").read_text())["resumed"] for n in names] == [True, True, False, False]
    # finished runs are skipped on the next run, even with last.ckpt in their run dirs
    results, _ = run(path, out, jobs=2)
    assert [r.status for r in results] == ["skipped"] * 4


@pytest.mark.parametrize("visible, jobs, slots", [
    ("0,1,2,3", 2, ["0,1", "2,3"]), ("0,1,2,3", 3, ["0", "1", "2"]), ("0,1", 4, ["0", "1", "0", "1"])])
def test_device_slots_split_the_visible_gpus(visible, jobs, slots, monkeypatch):
    from experiments.grid import device_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in device_slots(jobs)] == slots


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, at_root):
    """A run dir with checkpoints/last.ckpt and no finished metrics.json (what a Ctrl-C'd or
    preempted run leaves) runs on from that checkpoint to max_steps, not from step 0. The
    interruption is simulated: the same run, stopped after 1 of its 2 steps."""
    import subprocess
    import sys

    path = tmp_path / "resume.yaml"
    path.write_text(f"base: {TINY + ['tests/configs/resume.yaml']}\n"
                    "overrides: {trainer.enable_model_summary: false, trainer.max_steps: 2, trainer.val_check_interval: 2}\n"
                    f"axes: [{{name: fusion, values: [{GOOD_VALUE}]}}]\n")
    out = tmp_path / "out"
    (r,) = load_grid(path).runs()
    first = subprocess.run([sys.executable, "-m", "experiments.fit", *r.args(out / r.name), "--trainer.max_steps", "1"],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / r.name / "checkpoints" / "last.ckpt").is_file()
    (out / r.name / "metrics.json").unlink()  # it stopped before the end
    (result,), output = run(path, out)
    assert result.status == "finished" and result.summary["global_step"] == 2, output
    log = result.log.read_text()
    assert log.startswith("\n$ python -m experiments.fit ") and " --ckpt_path last\n" in log
    assert "Restoring states from the checkpoint" in log and "(resumed from last.ckpt)" in output


def test_status_shows_each_runs_state_from_its_run_dir(tmp_path, at_root, capsys, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    path = tmp_path / "g.yaml"
    labels = ["done", "broke", "going", "cut", "waits", "new"]
    path.write_text(f"base: {TINY}\naxes: [{{name: f, values: [{', '.join(f'{{label: {n}}}' for n in labels)}]}}]\n")
    out = tmp_path / "out"
    for n in labels[:5]:
        (out / n).mkdir(parents=True)
    (out / "done" / "metrics.json").write_text(json.dumps({"finished": True, "global_step": 2, "metrics": {"val/loss": 1.5}}))
    (out / "broke" / "grid_run.json").write_text(json.dumps({"state": "failed", "exit_code": 2}))
    (out / "broke" / "fit.log").write_text("$ python -m experiments.fit ...\nexperiments.fit: config error: boom\n")
    host = socket.gethostname()
    (out / "going" / "grid_run.json").write_text(json.dumps({"state": "running", "host": host, "pid": os.getpid()}))
    (out / "going" / "csv" / "version_0").mkdir(parents=True)
    (out / "going" / "csv" / "version_0" / "metrics.csv").write_text("step,train/loss\n3,1.0\n7,0.9\n")
    (out / "going" / "fit.log").write_text("Epoch 0:  70%|███████   | 7/10\r")
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (out / "cut" / "grid_run.json").write_text(json.dumps({"state": "running", "host": host, "pid": dead.pid}))
    (out / "cut" / "checkpoints").mkdir()
    (out / "cut" / "checkpoints" / "last.ckpt").write_text("")
    (out / "waits" / "grid_run.json").write_text(json.dumps({"state": "queued", "job_id": "123_4"}))
    monkeypatch.setenv("COLUMNS", "200")
    assert main([str(path), "--status", "--out", str(out)]) == []
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert rows == {
        "done": ["finished", "step 2, val/loss 1.5000"],
        "broke": ["failed", "exit code 2: experiments.fit: config error: boom"],
        "going": ["running", "step 7: Epoch 0:  70%|███████   | 7/10"],
        "cut": ["interrupted", "resumes from its newest intact checkpoint"],
        "waits": ["queued", "job 123_4"],
        "new": ["pending", ""]}
    assert not (out / "new").exists()


def _wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`): a ":W&B" header, then LevelDB-log
    chunks (crc32, length, type; 32 KiB blocks) holding `wandb_internal_pb2.Record` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, part = run_file.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_a_grid_with_wandb_logs_every_run_offline_with_its_group_tags_and_labels(tmp_path, at_root, monkeypatch):
    """`wandb: {project, mode: offline}` in a grid file: each run also logs to Lightning's
    WandbLogger, offline under RUN_DIR/wandb, with the grid's name as the W&B group, its labels
    as tags, the grid labels in its config, and its training curve."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = yaml.safe_load(TINY_GRID.read_text())
    spec["axes"][0]["values"] = spec["axes"][0]["values"][:1]
    spec["wandb"] = {"project": "casa-test", "mode": "offline"}
    grid = tmp_path / "wb_grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    results, output = run(grid, tmp_path / "out")
    assert [r.status for r in results] == ["finished"], output
    (run_file,) = (results[0].run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.project, info.run_group, list(info.tags), info.display_name) == (
        "casa-test", "wb_grid", ["casa_plus", "s2"], "casa_plus-s2")
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["grid/fusion"] == "casa_plus" and config["grid/steps"] == "s2" and "warmup_steps" in config
    logged = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
              for i in r.history.item}
    assert {"val/loss", "attention/layer_00/self"} <= logged, sorted(logged)


def test_every_run_logs_its_grid_labels_as_tensorboard_hparams(tiny):
    """TensorBoard's HParams view reads a run's first session summary: it holds the module's
    hyperparameters plus grid/<axis> labels; hp_metric ends as the final val/loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, out, results, _ = tiny
    for r in results:
        events = EventAccumulator(str(r.run_dir / "tb"))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert {k: hparams[k].string_value for k in ("grid/run", "grid/fusion", "grid/steps")} == {
            "grid/run": r.run.name, "grid/fusion": r.run.labels["fusion"], "grid/steps": "s2"}
        assert "warmup_steps" in hparams  # the module's own, in the same session
        assert events.Scalars("hp_metric")[-1].value == pytest.approx(r.metrics["val/loss"])
