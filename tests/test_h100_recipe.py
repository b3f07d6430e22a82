"""The H100 recipe as users run it, on 2 CPU processes (issue 14's end-to-end check).

`experiments.fit` through the CLI with the shipped FSDP2 trainer (`trainer/fsdp2_h100.yaml`:
ModelParallelStrategy, activation checkpointing, gradient accumulation) in bf16 parameters,
then with DDP in `bf16-mixed`, on data where one rank's batches hold no image at all (its
training shard is the text-only `arithmetic` task, the other rank's the image and video
tasks), with validation generation and attention maps on. Each run must finish, write
attention maps, and write validation metrics equal to a single-process evaluation of its
own checkpoint (`experiments.evaluate` in the run's precision), answer for answer; the next stage's
`init_from` and `experiments.evaluate` must load the checkpoint it wrote.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from data.synth import ensure_synth

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
DEMO, TINY = CONFIGS / "demo.yaml", ROOT / "tests" / "configs" / "tiny.yaml"
NEW_TOKENS = 6  # long enough that an untrained model's answers differ from sample to sample
FSDP2_CPU, INSTRUMENTS = ROOT / "tests" / "configs" / "fsdp2_cpu.yaml", ROOT / "tests" / "configs" / "instruments.yaml"


def _env() -> dict:
    from tests.test_configs import _env as env

    return env()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """Two single-shard sets: rank 0 trains on the text-only shard, rank 1 on the image one
    (a stream with at least as many shards as readers gives each reader its own shards)."""
    root = tmp_path_factory.mktemp("h100-data")
    ensure_synth(root / "text", train=24, val=4, test=4, tasks=["arithmetic"], progress=False)
    ensure_synth(root / "images", train=24, val=8, test=8, tasks=["color", "video_direction"], progress=False)
    return {split: f"{root}/{{text,images}}/{split}-000000.tar" for split in ("train", "val")}


def _fit(run: Path, files: list[Path], shards: dict[str, str], *extra: str, cwd: Path):
    args = [sys.executable, "-m", "experiments.fit"]
    for f in files:
        args += ["--config", str(f)]
    args += ["--run_dir", str(run), "--data.init_args.train", shards["train"], "--data.init_args.val", shards["val"],
             "--data.init_args.val_rows_samples", "3", "--trainer.limit_val_batches", "1.0",
             "--model.val_max_samples", "1000", "--model.val_max_new_tokens", str(NEW_TOKENS), *extra]
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return r


def _evaluate(ckpt: Path, data: str, cwd: Path, predictions: Path) -> dict:
    """`experiments.evaluate` in its default precision: the run's own."""
    r = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--ckpt", str(ckpt), "--data", data,
                        "--json", "--no-stream", "--max-new-tokens", str(NEW_TOKENS), "--batch-samples", "3",
                        "--predictions", str(predictions), "--threads", "1"],
                       cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def _answers(path: Path) -> list[dict]:
    """A predictions file's generated answers: evaluate's records also carry the teacher-forced
    pick over the task's answer set (`answer_set_prediction`), which validation does not score."""
    return [{k: v for k, v in json.loads(line).items() if k != "answer_set_prediction"}
            for line in path.read_text().splitlines()]


def _check_run(run: Path, shards: dict[str, str], cwd: Path) -> None:
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["finished"], summary
    logged = {k.split("/", 1)[1]: v for k, v in summary["metrics"].items() if k.startswith("val_task/")}
    assert {k.split("/")[0] for k in logged} == {"arithmetic", "color", "video_direction"}, sorted(logged)
    assert sorted(p.name for p in run.rglob("fig7.png")), "no attention maps were written"
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluated = _evaluate(ckpt, shards["val"], cwd, cwd / f"{run.name}-eval.jsonl")
    # answer for answer: every validation sample was generated once, across both ranks, as a
    # single process generates it from the checkpoint
    (logged_answers,) = list((run / "predictions").glob("*.jsonl"))
    ours, theirs = _answers(logged_answers), _answers(cwd / f"{run.name}-eval.jsonl")
    assert len(ours) == 12 and len({a["key"] for a in ours}) == 12
    assert ours == theirs
    # and the teacher-forced loss: val/loss is the token-weighted mean over both ranks' batches
    assert math.isclose(summary["metrics"]["val/loss"], evaluated["loss"]["answer_loss"], rel_tol=1e-5), (
        summary["metrics"]["val/loss"], evaluated["loss"])
    # evaluate adds the teacher-forced answer-set accuracy, which validation does not log
    flat = {f"{t}/{m}": v for t, ms in evaluated["tasks"].items() for m, v in ms.items() if m != "answer_set_accuracy"}
    # every task also logs its teacher-forced loss (val_task/<task>/loss), which evaluate
    # folds into its one answer_loss (compared with val/loss above)
    losses = {k for k in logged if k.endswith("/loss")}
    assert losses == {f"{t}/loss" for t in evaluated["tasks"]}, sorted(losses)
    logged = {k: v for k, v in logged.items() if k not in losses}
    assert set(flat) == set(logged)
    for k in logged:
        assert math.isclose(logged[k], flat[k], abs_tol=1e-6), (k, logged[k], flat[k])


@pytest.mark.distributed
def test_fsdp2_bf16_recipe_on_two_processes(shards, tmp_path):
    run = tmp_path / "fsdp2"
    _fit(run, [DEMO, TINY, CONFIGS / "trainer" / "fsdp2_h100.yaml", FSDP2_CPU, INSTRUMENTS], shards,
         "--model.fsdp_param_dtype", "bfloat16", "--model.activation_checkpointing", "true",
         "--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "4",
         cwd=tmp_path)
    _check_run(run, shards, tmp_path)
    # the next stage starts from the sharded checkpoint directory
    _fit(tmp_path / "next", [DEMO, TINY], shards, "--model.init_from", str(run / "checkpoints" / "last.ckpt"),
         "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", cwd=tmp_path)


@pytest.mark.distributed
def test_ddp_bf16_mixed_recipe_on_two_processes(shards, tmp_path):
    run = tmp_path / "ddp"
    _fit(run, [DEMO, TINY, CONFIGS / "trainer" / "ddp.yaml", INSTRUMENTS], shards,
         "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2",
         "--trainer.val_check_interval", "2", cwd=tmp_path)
    _check_run(run, shards, tmp_path)
