"""Every YAML in experiments/configs/ runs (tiny overrides, two steps), distributed trainers
run with 2 CPU processes, an interrupted-then-resumed run logs the losses of an
uninterrupted one, and wrong config values fail at startup naming field, value and choices.

Runs are in-process (`experiments.fit.main`) where possible, as a user would run them but
without paying the import cost each time; DDP/FSDP2 runs are subprocesses, since Lightning
launches the other ranks by re-running the command line.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
DEMO = CONFIGS / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
TINY_MIXTURE = ROOT / "tests" / "configs" / "tiny_mixture.yaml"
TINY_QWEN = ROOT / "tests" / "configs" / "tiny_qwen2_5_vl.yaml"
FSDP2_CPU = ROOT / "tests" / "configs" / "fsdp2_cpu.yaml"
RESUME = ROOT / "tests" / "configs" / "resume.yaml"
INSTRUMENTS = ROOT / "tests" / "configs" / "instruments.yaml"
DISTRIBUTED = {"trainer/ddp.yaml", "trainer/fsdp2_h100.yaml"}  # run as 2-process subprocesses below


def all_configs() -> list[str]:
    """Every fit config but the protocols' (`protocol/`, `protocol_v2/`: they read pretrained parts
    that `experiments.pretrain` builds; tests/test_protocol.py runs v1's on tiny stand-ins, and
    tests/test_grid.py parses v2's grids with the fit CLI)."""
    return sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
                  if p.relative_to(CONFIGS).parts[0] not in ("protocol", "protocol_v2"))


def composition(name: str) -> list[Path]:
    """The config files a smoke run of `name` composes, in order. Strategy and trainer
    configs are fragments layered on the demo; full configs stand alone; the tiny
    overrides come last, plus the tiny data/backbone variants the config needs."""
    path = CONFIGS / name
    files = [path] if name == "demo.yaml" or name.startswith("paper/") else [DEMO, path]
    files.append(TINY)
    raw = yaml.safe_load(path.read_text()) or {}
    data_cls = str((raw.get("data") or {}).get("class_path", ""))
    if data_cls.endswith("MixtureDataModule"):
        files.append(TINY_MIXTURE)
    if "family: qwen2_5_vl" in path.read_text():
        files.append(TINY_QWEN)
    return files


def fit_args(files: list[Path], run_dir: Path, *extra: str) -> list[str]:
    args: list[str] = []
    for f in files:
        args += ["--config", str(f)]
    return args + ["--run_dir", str(run_dir), *extra]


@pytest.fixture
def in_tmp(tmp_path, tmp_path_factory, monkeypatch):
    """Relative paths of the configs (runs/...) resolve inside tmp_path, so parallel test
    workers never share a run directory. The tiny synthetic set (runs/test-synth) is one
    directory shared by all tests and workers: `ensure_synth` generates it once (its writes
    are atomic, so concurrent workers are safe) and later runs find it complete."""
    shared = tmp_path_factory.getbasetemp().parent / "test-synth"
    shared.mkdir(exist_ok=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "test-synth").symlink_to(shared, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["experiments.fit"])  # LightningCLI(args=...) must not see pytest's argv
    return tmp_path


def finished(run_dir: Path, steps: int) -> dict:
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == steps and summary["finished"], summary
    return summary


# ---------------------------------------------------------------------------------- smoke
@pytest.mark.parametrize("name", [c for c in all_configs() if c not in DISTRIBUTED])
def test_every_config_trains_two_steps(name, in_tmp):
    from experiments.fit import main

    raw = yaml.safe_load((CONFIGS / name).read_text()) or {}
    cli = main(fit_args(composition(name), in_tmp / "run"))
    summary = finished(in_tmp / "run", 2)
    assert "val/loss" in summary["metrics"]
    assert any(k.startswith("val_group/") for k in summary["metrics"]), "validation generation did not run"
    # the config's fusion strategy (its own, or the demo's CASA) is what got built
    fusion = (((raw.get("model") or {}).get("model") or {}).get("init_args") or {}).get("fusion")
    expected = (fusion or {}).get("class_path", "casa.fusion.CASA").rsplit(".", 1)[-1]
    assert type(cli.model.model.fusion).__name__ == expected
    assert (in_tmp / "run" / "checkpoints" / "last.ckpt").is_file() or list((in_tmp / "run").rglob("*.ckpt"))


def test_every_config_is_exercised():
    """New configs are picked up by the glob above; this guards the composition rules."""
    names = all_configs()
    assert "demo.yaml" in names and DISTRIBUTED <= set(names)
    assert {n.split("/")[0] for n in names if "/" in n} == {"strategies", "paper", "trainer"}
    for n in names:
        assert all(f.is_file() for f in composition(n))


# ---------------------------------------------------------------------------- config errors
ERRORS = [
    (["--model.model.init_args.fusion.init_args.mode", "bogus"], ["mode", "bogus", "plus", "before", "replace"]),
    (["--model.model.init_args.fusion.init_args.placement", "middle"], ["placement", "middle", "every_k", "first_k"]),
    (["--model.model.init_args.backbone.init_args.family", "gpt2"], ["family", "gpt2", "llama", "qwen2_5_vl"]),
    (["--model.model.init_args.projector", "conv"], ["projector", "conv", "mlp", "identity"]),
    (["--data.init_args.template", "chatml"], ["template", "chatml", "helium", "qwen2_5_vl"]),
    (["--model.fsdp_param_dtype", "fp8"], ["fsdp_param_dtype", "fp8", "bfloat16"]),
    (["--config", "missing_checkpoint.yaml"], ["/no/such/checkpoint"]),
    (["--data.init_args.train", "/no/such/shards-{0..3}.tar"], ["/no/such/shards", "no shard matches"]),
]


@pytest.mark.parametrize("extra,needles", ERRORS, ids=[e[0][-2].rsplit(".", 1)[-1] for e in ERRORS])
def test_wrong_values_fail_at_startup_naming_field_and_choices(extra, needles, in_tmp, capsys):
    from experiments.fit import main

    _missing_checkpoint_config(in_tmp)
    with pytest.raises(SystemExit) as exit_:
        main(fit_args([DEMO, TINY], in_tmp / "run", *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err[-2000:]}"
    assert not (in_tmp / "run" / "metrics.json").exists()


def _missing_checkpoint_config(directory: Path) -> None:
    backbone = {"init_args": {"config": None, "path": "/no/such/checkpoint"}}
    cfg = {"model": {"model": {"init_args": {"backbone": backbone}}}}
    (directory / "missing_checkpoint.yaml").write_text(yaml.safe_dump(cfg))


def test_config_error_from_the_command_line_has_no_traceback(in_tmp):
    _missing_checkpoint_config(in_tmp)
    extra = ["--config", "missing_checkpoint.yaml"]
    r = subprocess.run([sys.executable, "-m", "experiments.fit", *fit_args([DEMO, TINY], in_tmp / "run", *extra)],
                       cwd=in_tmp, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and "/no/such/checkpoint" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CASA_TRACEBACK", None)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: one thread each, no oversubscription
    return env


# ---------------------------------------------------------------------------- exact resume
def _losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def test_interrupted_then_resumed_run_logs_the_same_losses(in_tmp):
    """Run A trains 6 steps. Run B is the same command interrupted after step 3 (a callback
    stops it, as a preemption would, with the step-3 checkpoint on disk) and then re-run
    with `--ckpt_path last`: the resumed steps see the same data and produce the same
    losses, bit for bit on CPU."""
    from experiments.fit import main

    files = [DEMO, TINY, RESUME]
    main(fit_args(files, in_tmp / "a"))
    full = _losses(in_tmp / "a")
    assert sorted(full) == list(range(6))

    main(fit_args(files, in_tmp / "b", "--trainer.callbacks+=callbacks.stop.StopAfterSteps",
                  "--trainer.callbacks.steps=3"))
    assert not (in_tmp / "b" / "metrics.json").exists() or not json.loads((in_tmp / "b" / "metrics.json").read_text())["finished"]
    first = _losses(in_tmp / "b")
    assert sorted(first) == [0, 1, 2]
    shutil.move(in_tmp / "b" / "csv", in_tmp / "b" / "csv-before")  # keep the two halves' logs apart
    main(fit_args(files, in_tmp / "b", "--ckpt_path", "last"))
    resumed = _losses(in_tmp / "b")
    assert sorted(resumed) == [3, 4, 5]
    assert {**first, **resumed} == full


def _csv_keys(run_dir: Path) -> list[str]:
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return next(csv.reader(f))


# ---------------------------------------------------------------------------- distributed
def _run_distributed(in_tmp: Path, files: list[Path], run: str, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "experiments.fit", *fit_args(files, in_tmp / run, *extra)],
                       cwd=in_tmp, capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return r


@pytest.mark.distributed
def test_ddp_two_processes(in_tmp):
    _run_distributed(in_tmp, [DEMO, TINY, CONFIGS / "trainer" / "ddp.yaml", INSTRUMENTS], "ddp",
                     "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3")
    summary = finished(in_tmp / "ddp", 3)
    assert "val/loss" in summary["metrics"]
    # rank zero writes each file once: one metrics.json, one Fig. 7 per capture step, one CSV
    run = in_tmp / "ddp"
    assert len(list(run.rglob("metrics.json"))) == 1
    fig7 = sorted(p.relative_to(run) for p in run.rglob("fig7.png"))
    assert fig7 and len(fig7) == len(set(p.parent for p in fig7))
    assert len(list(run.rglob("metrics.csv"))) == 1
    assert any(k.startswith("memory/") for k in _csv_keys(run))


@pytest.mark.distributed
def test_fsdp2_two_processes_saves_and_resumes(in_tmp):
    files = [DEMO, TINY, CONFIGS / "trainer" / "fsdp2_h100.yaml", FSDP2_CPU, INSTRUMENTS]
    ckpt: list[str] = []
    _run_distributed(in_tmp, files, "fsdp", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *ckpt)
    finished(in_tmp / "fsdp", 2)
    last = in_tmp / "fsdp" / "checkpoints" / "last.ckpt"
    assert last.exists(), sorted(p.name for p in (in_tmp / "fsdp").rglob("*"))
    # FSDP2 checkpoints are sharded directories (one file per rank + metadata)
    assert last.is_dir() and any(last.iterdir())
    _run_distributed(in_tmp, files, "fsdp", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                     *ckpt, "--ckpt_path", "last")
    finished(in_tmp / "fsdp", 4)
