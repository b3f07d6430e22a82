"""A diverged run is a failure (issue 26 item 2): detected every step with one host sync,
skipped up to `max_skips`, then stopped; metrics.json and the grid say why; no non-finite
checkpoint replaces a good one; evaluate/export/stream refuse non-finite weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.nonfinite import NonFiniteGuard
from tests.builders import SyncCounter
from tests.helpers import fit_demo_tiny, tiny_synth

ROOT = Path(__file__).resolve().parents[1]


def _trainer(step: int = 0):
    """What the guard reads of a Trainer (single process: reduce is the identity)."""
    return SimpleNamespace(global_step=step, should_stop=False, is_global_zero=True,
                           precision_plugin=SimpleNamespace(),
                           strategy=SimpleNamespace(reduce=lambda t, reduce_op=None: t))


def _model_with_grads(layers: int, bad: float | None = None):
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])
    model(torch.randn(2, 8)).sum().backward()
    if bad is not None:
        model[layers // 2].weight.grad[0, 0] = bad
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _step(guard, trainer, optimizer, loss: float = 1.0) -> None:
    guard.on_before_backward(trainer, SimpleNamespace(device=torch.device("cpu")), torch.tensor(loss))
    guard.on_before_optimizer_step(trainer, SimpleNamespace(device=torch.device("cpu")), optimizer)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_update_then_stops_the_run(bad):
    guard, trainer = NonFiniteGuard(max_skips=1), _trainer(step=4)
    model, opt = _model_with_grads(3, bad)
    before = [p.detach().clone() for p in model.parameters()]
    _step(guard, trainer, opt)
    opt.step()
    assert all(p.grad is None for p in model.parameters())  # dropped: the step changes nothing
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert guard.skipped == 1 and guard.failure is None and not trainer.should_stop
    model2, opt2 = _model_with_grads(3, bad)
    trainer.global_step = 7
    _step(guard, trainer, opt2)
    assert guard.failure == "non-finite gradient at step 8" and trainer.should_stop


def test_a_non_finite_loss_is_named_and_finite_steps_pass():
    guard, trainer = NonFiniteGuard(), _trainer()
    model, opt = _model_with_grads(2)
    _step(guard, trainer, opt)
    assert guard.skipped == 0 and guard.failure is None and all(p.grad is not None for p in model.parameters())
    _step(guard, trainer, opt, loss=float("nan"))
    assert guard.failure == "non-finite loss at step 1" and trainer.should_stop  # max_skips=0: the first stops


def test_the_check_is_one_host_sync_per_step_whatever_the_depth():
    counts = []
    for layers in (2, 8):
        guard, trainer = NonFiniteGuard(), _trainer()
        _, opt = _model_with_grads(layers)
        with SyncCounter() as syncs:
            for micro_batch_loss in (1.0, 2.0):  # gradient accumulation: flags stay on the device
                guard.on_before_backward(trainer, None, torch.tensor(micro_batch_loss))
            guard.on_before_optimizer_step(trainer, SimpleNamespace(device=torch.device("cpu")), opt)
        counts.append(syncs.count)
    assert counts == [1, 1], counts


def test_max_skips_is_validated_and_the_count_survives_a_resume():
    with pytest.raises(ValueError, match=r"NonFiniteGuard.max_skips=-1 must be an integer >= 0"):
        NonFiniteGuard(max_skips=-1)
    guard = NonFiniteGuard(max_skips=3)
    guard.skipped = 2
    resumed = NonFiniteGuard(max_skips=3)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.skipped == 2


def test_a_non_finite_checkpoint_never_replaces_a_good_one(tmp_path):
    from casa.train.checkpoint_io import AtomicCheckpointIO, NonFiniteCheckpointError

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"model.w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()
    with pytest.raises(NonFiniteCheckpointError, match=r"non-finite weights: 1 of 2 tensors .*model.w.*not written, "
                                                       r"the previous last.ckpt is kept"):
        io.save_checkpoint({"state_dict": {"model.w": torch.tensor([1.0, float("nan")]), "model.b": torch.ones(1)},
                            "global_step": 2}, path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    synth = tiny_synth(root)
    return {"ckpt": fit_demo_tiny(root, synth), "synth": synth, "root": root}


def test_a_diverged_fit_exits_non_zero_and_metrics_json_says_why(trained, tmp_path, capsys, monkeypatch):
    from casa.checkpoint import read_checkpoint
    from experiments.fit import main as fit
    from experiments.grid import run_state

    monkeypatch.setattr(sys, "argv", ["experiments.fit"])
    configs, run = ROOT / "experiments" / "configs", tmp_path / "run"
    ckpt = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "every_n_train_steps": 1}}]
    with pytest.raises(SystemExit) as e:  # lr 1e8: finite step 1, NaN loss from step 2 (issue 26's case)
        fit(["--config", str(configs / "demo.yaml"), "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"),
             "--run_dir", str(run), "--synth", "null", "--data.init_args.train", str(trained["synth"]),
             "--data.init_args.val", str(trained["synth"]), "--trainer.max_steps", "6",
             "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--model.lr_new", "1e8", "--model.lr_pretrained", "1e8", "--trainer.callbacks", json.dumps(ckpt)])
    assert e.value.code == 1
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["finished"] is False and summary["failure"].startswith("non-finite loss at step ")
    step = int(summary["failure"].rsplit(" ", 1)[1])
    assert step < 6 and f"experiments.fit: failed: non-finite loss at step {step}" in capsys.readouterr().err
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] <= step  # finite, readable
    # the grid's status (`--status`) reads the run directory alone
    (run / "grid_run.json").write_text(json.dumps({"state": "failed", "exit_code": 1}))
    assert run_state(run) == ("failed", summary["failure"])


@pytest.mark.parametrize("cli", ["evaluate", "export", "stream"])
def test_inference_commands_refuse_non_finite_weights(trained, tmp_path, cli, capsys, monkeypatch):
    from experiments.evaluate import main as evaluate
    from experiments.export import main as export
    from experiments.stream import main as stream

    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    name = sorted(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())[0]
    ckpt["state_dict"][name][..., 0] = float("nan")
    bad = tmp_path / "diverged.ckpt"
    torch.save(ckpt, bad)
    argv = {"evaluate": (evaluate, ["--ckpt", str(bad), "--data", str(trained["synth"]), "--max-samples", "1"]),
            "export": (export, ["--ckpt", str(bad), "--out", str(tmp_path / "hf")]),
            "stream": (stream, ["--ckpt", str(bad), "--video", "synthetic", "--frames", "1", "--no-wait"])}[cli]
    assert argv[0](argv[1]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad} has non-finite weights: 1 of " in err and name in err and "Traceback" not in err


def test_the_grid_records_the_failure_of_a_diverged_run(tmp_path):
    """What experiments.grid reads of a run that exited 1 with metrics.json's failure."""
    from experiments.grid import _collect, _Launched, load_grid, write_results

    grid = load_grid(ROOT / "tests" / "configs" / "tiny_grid.yaml")
    run = grid.runs()[0]
    run_dir = tmp_path / run.name
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"finished": False, "failure": "non-finite loss at step 3"}))
    job = _Launched(run, run_dir, run.name, run.args(run_dir), False, SimpleNamespace(returncode=1),
                    open(run_dir / "fit.log", "w"), 0.0)
    result = _collect(job)
    assert result.status == "failed"
    assert json.loads((run_dir / "grid_run.json").read_text())["failure"] == "non-finite loss at step 3"
    write_results([result], grid, tmp_path, "exact_match")
    assert f"`{run.name}`: failed: non-finite loss at step 3, exit code 1" in (tmp_path / "results.md").read_text()
