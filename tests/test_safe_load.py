"""Nothing in a checkpoint runs code (issue 26 item 1), and reading one for inference needs no
Lightning (issue 27 item 8).

A "poisoned" checkpoint's pickle calls `os.system("touch MARKER")` from a `__reduce__`: under
`torch.load(weights_only=False)` (or DCP's plain `pickle.load` of `.metadata`) the marker
appears. Every reader (evaluate, export, stream, consolidate, init_from, Lightning's resume,
`casa.assistant.load`) must refuse it in one line, with exit code 2, and the marker must not exist."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import fit_demo_tiny, tiny_synth

ROOT = Path(__file__).resolve().parents[1]


class Poison:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OldRunConfig:
    """An arbitrary Python object in an old checkpoint (a namespace-like config)."""

    def __init__(self):
        self.name, self.lr = "run", 1e-3


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safe_load")
    synth = tiny_synth(root)
    return {"ckpt": fit_demo_tiny(root, synth), "synth": synth, "root": root}


def _poisoned_file(tmp: Path, marker: Path) -> Path:
    path = tmp / "poisoned.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "global_step": 1, "hyper_parameters": Poison(marker)}, path)
    return path


def _one_line_refusal(err: str, path: Path) -> None:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("(set CASA_TRACEBACK")]
    assert len(lines) == 1, err
    assert "wants to run code" in lines[0] and "posix.system" in lines[0] and str(path) in lines[0], err
    assert "Traceback" not in err


def test_every_cli_refuses_a_pickle_that_wants_code_in_one_line(trained, tmp_path, capsys, monkeypatch):
    from experiments.consolidate import main as consolidate
    from experiments.evaluate import main as evaluate
    from experiments.export import main as export
    from experiments.stream import main as stream

    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    marker = tmp_path / "MARKER"
    bad = _poisoned_file(tmp_path, marker)
    runs = {
        "evaluate": lambda: evaluate(["--ckpt", str(bad), "--data", str(trained["synth"]), "--max-samples", "1"]),
        "export": lambda: export(["--ckpt", str(bad), "--out", str(tmp_path / "hf")]),
        "stream": lambda: stream(["--ckpt", str(bad), "--video", "synthetic", "--frames", "1", "--no-wait"]),
        "consolidate": lambda: consolidate([str(bad), str(tmp_path / "full.ckpt")]),
    }
    for name, run in runs.items():
        capsys.readouterr()
        assert run() == 2, name
        _one_line_refusal(capsys.readouterr().err, bad)
        assert not marker.exists(), f"{name} ran the checkpoint's code"
    assert not (tmp_path / "hf").exists() and not (tmp_path / "full.ckpt").exists()


def test_init_from_refuses_a_pickle_that_wants_code(trained, tmp_path, capsys, monkeypatch):
    from experiments.fit import main as fit

    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["experiments.fit"])
    marker = tmp_path / "MARKER"
    bad = _poisoned_file(tmp_path, marker)
    configs = ROOT / "experiments" / "configs"
    with pytest.raises(SystemExit) as e:
        fit(["--config", str(configs / "demo.yaml"), "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"),
             "--synth", "null", "--run_dir", str(tmp_path / "run"), "--model.init_from", str(bad),
             "--data.init_args.train", str(trained["synth"]), "--data.init_args.val", str(trained["synth"])])
    assert e.value.code == 2
    _one_line_refusal(capsys.readouterr().err, bad)
    assert not marker.exists()


def test_a_subprocess_cli_exits_2_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    bad = _poisoned_file(tmp_path, marker)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CASA_TRACEBACK", None)
    p = subprocess.run([sys.executable, "-m", "experiments.consolidate", str(bad), str(tmp_path / "out.ckpt")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    _one_line_refusal(p.stderr, bad)
    assert not marker.exists()


def _dcp_dir(directory: Path, state_dict: dict, meta: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": state_dict}, checkpoint_id=directory, no_dist=True)
    torch.save(meta, directory / "meta.pt")
    return directory


@pytest.mark.parametrize("where", ["meta.pt", ".metadata", "shard entry"])
def test_a_distributed_checkpoint_that_wants_code_is_refused(tmp_path, where):
    from casa.checkpoint import CheckpointError, read_checkpoint

    marker = tmp_path / "MARKER"
    weights = {"model.w": torch.ones(3)}
    if where == "shard entry":  # a non-tensor entry: DCP's planner would torch.load it with weights_only=False
        weights["model.extra"] = Poison(marker)
    d = _dcp_dir(tmp_path / "last.ckpt", weights, {"global_step": 2, **({"x": Poison(marker)} if where == "meta.pt" else {})})
    if where == ".metadata":  # DCP reads its index with plain pickle.load
        (d / ".metadata").write_bytes(pickle.dumps(Poison(marker)))
    with pytest.raises(CheckpointError, match="wants to run code") as e:
        read_checkpoint(d)
    assert "\n" not in str(e.value) and not marker.exists()
    # the resume path too (Lightning's own DCP loader would unpickle the index and the entries in full)
    from casa.checkpoint import resolve_resume

    with pytest.raises(CheckpointError, match=r"--ckpt_path .*last.ckpt.*wants to run code"):
        resolve_resume(str(d), None)
    assert not marker.exists()


def test_an_old_checkpoint_with_python_objects_is_converted_by_one_command(tmp_path, capsys):
    from casa.checkpoint import CheckpointError, read_checkpoint
    from experiments.consolidate import main as consolidate

    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "config": OldRunConfig(),
                "hyper_parameters": {"init_from": Path("/runs/a/last.ckpt")}}, old)
    with pytest.raises(CheckpointError, match=r"--trust-pickle .*old.ckpt NEW.ckpt"):
        read_checkpoint(old)
    assert consolidate(["--trust-pickle", str(old), str(tmp_path / "new.ckpt")]) == 0
    new = read_checkpoint(tmp_path / "new.ckpt")
    assert new["config"] == {"name": "run", "lr": 1e-3}
    assert new["hyper_parameters"]["init_from"] == Path("/runs/a/last.ckpt")  # paths are on the allowlist
    assert torch.equal(new["state_dict"]["model.w"], torch.ones(2))


def test_lightning_resume_reads_with_the_safe_loader(tmp_path):
    from casa.checkpoint import CheckpointError
    from casa.train.checkpoint_io import AtomicCheckpointIO

    marker = tmp_path / "MARKER"
    with pytest.raises(CheckpointError, match="wants to run code"):
        AtomicCheckpointIO().load_checkpoint(_poisoned_file(tmp_path, marker))
    assert not marker.exists()


def _lightning_free(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line is JSON, to which the Lightning
    modules it imported are added."""
    code += """
print(json.dumps({**result, "lightning": sorted(m for m in sys.modules
      if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric'))}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_reading_a_checkpoint_for_inference_imports_no_lightning(trained, tmp_path):
    """casa.assistant.load rebuilds the model from the stored resolved config (plain YAML data)."""
    ckpt = str(trained["ckpt"])
    out = _lightning_free(f"""
import json, sys
import casa.assistant
from casa.checkpoint import read_checkpoint
read_checkpoint({ckpt!r})
result = {{"step": casa.assistant.load({ckpt!r}).global_step}}
""", tmp_path)
    assert out == {"step": 2, "lightning": []}


@pytest.mark.slow
def test_evaluate_stream_and_export_import_no_lightning(trained, tmp_path):
    ckpt, synth = str(trained["ckpt"]), str(trained["synth"])
    out = _lightning_free(f"""
import contextlib, io, json, sys
from experiments.evaluate import main as evaluate
from experiments.export import main as export
from experiments.stream import main as stream
with contextlib.redirect_stdout(io.StringIO()):
    codes = [evaluate(["--ckpt", {ckpt!r}, "--data", {synth!r}, "--max-samples", "1", "--max-new-tokens", "1", "--json"]),
             stream(["--ckpt", {ckpt!r}, "--video", "synthetic", "--frames", "1", "--no-wait", "--max-new-tokens", "1",
                     "--json"]),
             export(["--ckpt", {ckpt!r}, "--out", {str(tmp_path / "hf")!r}])]
result = {{"codes": codes}}
""", tmp_path)
    assert out == {"codes": [0, 0, 0], "lightning": []}
