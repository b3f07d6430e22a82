"""Atomic writes whatever TMPDIR is (issue 26 item 3): checkpoints, shards and consolidated files
appear whole or not at all; a kill or a full disk keeps the previous file; `--ckpt_path last`
resumes from the newest intact checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from casa.atomic import atomic_write, remove_orphans
from tests.helpers import tiny_synth

ROOT = Path(__file__).resolve().parents[1]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _enospc)  # the data reaches the disk at fsync: where ENOSPC shows
    with pytest.raises(OSError) as e:
        with atomic_write(path) as f:
            f.write(b"new" * 1000)
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


def test_the_temporary_file_is_beside_the_destination_never_in_tmpdir(tmp_path, monkeypatch):
    """Lightning's own writer makes its temporary file with tempfile.mkstemp ($TMPDIR), then moves
    it: a copy across filesystems. Ours never asks tempfile for anything."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from casa.train.checkpoint_io import AtomicCheckpointIO

    made: list[str] = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    ckpt = {"state_dict": {"model.w": torch.ones(4)}, "global_step": 1}
    TorchCheckpointIO().save_checkpoint(ckpt, tmp_path / "lightning.ckpt")
    assert made and not made[0].startswith(str(tmp_path))  # the failure mode: outside the checkpoint's directory
    made.clear()
    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "last.ckpt")
    assert made == [] and torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["model.w"],
                                      torch.ones(4))


KILLED_WRITER = """
import sys, time, torch
from casa.atomic import atomic_write
with atomic_write(sys.argv[1]) as f:  # what AtomicCheckpointIO.save_checkpoint does, without importing Lightning
    torch.save({"state_dict": {"model.w": torch.full((50000,), 2.0)}, "global_step": 2}, f)
    f.truncate(f.tell() // 2)  # half the bytes on disk, then a stall: the kill lands mid-write
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_kill_mid_write_keeps_the_previous_checkpoint(tmp_path):
    from casa.checkpoint import newest_intact, read_checkpoint
    from casa.train.checkpoint_io import AtomicCheckpointIO

    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"model.w": torch.ones(3)}, "global_step": 1}, last)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(last)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_checkpoint(last)["global_step"] == 1  # the previous checkpoint, whole
    orphans = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(orphans) == 1 and orphans[0].name.startswith(".last.ckpt.") and orphans[0].name.endswith(".tmp")
    assert newest_intact(tmp_path) == (last, [])  # the orphan is never a candidate
    assert remove_orphans(last) == orphans and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_ckpt_path_last_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    from casa.checkpoint import CheckpointError, resolve_resume

    for step, name in ((2, "epoch=0-step=2.ckpt"), (4, "epoch=0-step=4.ckpt"), (6, "last.ckpt")):
        torch.save({"state_dict": {"model.w": torch.ones(2)}, "global_step": step}, tmp_path / name)
        os.utime(tmp_path / name, (step, step))
    assert resolve_resume("last", tmp_path) == str(tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 3])  # a truncated last.ckpt (pre-atomic writer)
    with pytest.warns(UserWarning, match=r"skipping .*last.ckpt \(truncated"):
        assert resolve_resume("last", tmp_path) == str(tmp_path / "epoch=0-step=4.ckpt")
    assert (tmp_path / "last.ckpt.damaged").read_bytes() == data[: len(data) // 3]  # aside: the next last.ckpt is new
    for name in ("epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"no intact checkpoint in .* \(2 damaged"):
        resolve_resume("last", tmp_path)
    assert resolve_resume("last", tmp_path / "empty") == "last"  # nothing yet: Lightning starts from scratch


def test_a_truncated_distributed_checkpoint_is_not_intact(tmp_path):
    import torch.distributed.checkpoint as dcp

    from casa.checkpoint import checkpoint_problem

    d = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {"model.w": torch.randn(64, 64)}}, checkpoint_id=d, no_dist=True)
    torch.save({"global_step": 1}, d / "meta.pt")
    assert checkpoint_problem(d) is None
    shard = next(d.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint_problem(d) == f"shard {shard.name} is missing or truncated"


def _fit_args(synth: Path, run: Path, *extra: str) -> list[str]:
    configs = ROOT / "experiments" / "configs"
    ckpt = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": -1}}]
    return ["--config", str(configs / "demo.yaml"), "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"),
            "--run_dir", str(run), "--synth", "null", "--data.init_args.train", str(synth),
            "--data.init_args.val", str(synth), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks", json.dumps(ckpt), *extra]


def test_fit_on_a_full_disk_fails_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    """Step 1's checkpoints are written; at step 2 the disk is full. Then `--ckpt_path last`
    with a truncated last.ckpt resumes from the newest intact step checkpoint."""
    import casa.atomic
    from casa.checkpoint import read_checkpoint
    from experiments.fit import main as fit

    monkeypatch.setattr(sys, "argv", ["experiments.fit"])
    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    synth, run = tiny_synth(tmp_path), tmp_path / "run"
    real_fsync = os.fsync
    written: list[str] = []
    real_commit = casa.atomic.AtomicFile.commit

    def commit_until_full(self):  # step 2's first checkpoint write finds the disk full (at its fsync)
        if "step=2" in self.path.name or (self.path.name == "last.ckpt" and len(written) >= 2):
            casa.atomic.os.fsync = _enospc
        try:
            written.append(self.path.name)
            return real_commit(self)
        finally:
            casa.atomic.os.fsync = real_fsync

    monkeypatch.setattr(casa.atomic.AtomicFile, "commit", commit_until_full)
    with pytest.raises(SystemExit) as e:
        fit(_fit_args(synth, run, "--trainer.max_steps", "3"))
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["experiments.fit"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("experiments.fit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].endswith("cannot write checkpoint " + str(run / "checkpoints" / "epoch=0-step=2.ckpt") +
                             ": No space left on device; nothing was written under that name"), lines[0]
    ckpts = run / "checkpoints"
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]  # no partial file
    assert json.loads((run / "metrics.json").read_text())["finished"] is False

    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipping .*last.ckpt"):
        fit(_fit_args(synth, run, "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 2  # resumed from step 1, trained one more
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt",
                                                      "last.ckpt.damaged"]


def test_shards_never_appear_truncated_under_their_name(tmp_path, monkeypatch):
    from data.format import ShardWriter

    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError):
        with ShardWriter(tmp_path, "train", max_count=2) as w:
            for i in range(3):
                w.write({"__key__": f"k{i}", "txt": "hello"})
    assert list(tmp_path.glob("*.tar")) == [] and [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_directory_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """What an export writes (several files) through `atomic_directory`."""
    from casa.atomic import atomic_directory

    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"v1")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(OSError):  # a full disk half-way through a second export
        with atomic_directory(out) as tmp:
            (tmp / "config.json").write_text('{"v": 2}')
            _enospc()
    assert (out / "model.safetensors").read_bytes() == b"v1" and (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with atomic_directory(out) as tmp:  # a complete one replaces the old one whole
        (tmp / "model.safetensors").write_bytes(b"v2")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"] and sorted(
        p.name for p in tmp_path.iterdir()) == ["export"]


def test_consolidate_on_a_full_disk_fails_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from experiments.consolidate import main as consolidate

    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "global_step": 1}, tmp_path / "a.ckpt")
    (tmp_path / "out.ckpt").write_bytes(b"previous")
    monkeypatch.setattr(os, "fsync", _enospc)
    assert consolidate([str(tmp_path / "a.ckpt"), str(tmp_path / "out.ckpt")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (f"experiments.consolidate: error: [Errno {errno.ENOSPC}] "
                                                       f"{os.strerror(errno.ENOSPC)}")
    assert (tmp_path / "out.ckpt").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "out.ckpt"]


def test_fsdp2_checkpoint_directories_appear_whole(tmp_path, monkeypatch):
    """AtomicModelParallelStrategy (trainer/fsdp2_h100.yaml) in one process: a full disk while
    the shards of step 2 are written keeps step 1's directory whole; Lightning's own strategy
    writes into the old directory and leaves it damaged."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning.pytorch.strategies import model_parallel

    from casa.checkpoint import checkpoint_problem, read_checkpoint
    from casa.train.strategy import AtomicModelParallelStrategy

    def strategy(cls):
        s = cls(save_distributed_checkpoint=True)
        s.broadcast = lambda obj, src=0: obj
        s.barrier = lambda *args, **kwargs: None
        return s

    def ckpt(step: int) -> dict:
        return {"state_dict": {"model.w": torch.full((64, 64), float(step))}, "global_step": step,
                "optimizer_states": []}

    real = model_parallel._distributed_checkpoint_save

    def full_disk(state, path):  # the first shard file is cut short, then ENOSPC
        real(state, path)
        shard = next(Path(path).glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:64])
        _enospc()

    for cls, survives in ((AtomicModelParallelStrategy, True), (ModelParallelStrategy, False)):
        last = tmp_path / cls.__name__ / "last.ckpt"
        s = strategy(cls)
        s.save_checkpoint(ckpt(1), last)
        assert read_checkpoint(last)["global_step"] == 1
        monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", full_disk)
        with pytest.raises(OSError):
            s.save_checkpoint(ckpt(2), last)
        monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", real)
        assert (checkpoint_problem(last) is None) == survives, cls.__name__
        if survives:
            assert read_checkpoint(last)["global_step"] == 1
            s.save_checkpoint(ckpt(3), last)  # the next write clears the partial directory and swaps in
            assert read_checkpoint(last)["global_step"] == 3
            assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
