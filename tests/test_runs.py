"""A run directory holds one run, written by one process (issue 26, items 5 and 9):

- `experiments.runlock`: a live owner of RUN_DIR/run.lock is refused and named, a lock left by
  a killed process is taken over; `experiments.fit` takes it (and refuses a second fit);
- a new run into a used run directory is refused with the ways out, never `last-v1.ckpt`;
  `--ckpt_path last` keeps the earlier rows of metrics.csv;
- a killed grid leaves no training behind, unless its runs were started `--detach`ed; a grid
  re-run does not start a second fit on a run a live process holds;
- benchmarks write under runs/ unless told otherwise.

Fits are in-process (`experiments.fit.main`, the tiny config); grids use a stand-in for fit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from experiments.runlock import RunDirUsed, RunLock, RunLocked, check_one_run, holder

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
RESUME = ROOT / "tests" / "configs" / "resume.yaml"

HOLD = """\
import sys, time
from experiments.runlock import RunLock
lock = RunLock(sys.argv[1])  # kept: the lock lives as long as its open file
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _holding(run_dir: Path) -> subprocess.Popen:
    """Another process that holds run_dir's lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


# ---------------------------------------------------------------------------- the lock
def test_a_live_lock_is_refused_naming_its_owner_and_a_dead_ones_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    proc = _holding(run_dir)
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(run_dir, wait_s=0.2).acquire()
        assert e.value.owner.pid == proc.pid
        assert f"run dir {run_dir} is in use by pid {proc.pid} on " in str(e.value)
        assert holder(run_dir).pid == proc.pid
    finally:
        proc.kill()  # SIGKILL: no chance to release
        proc.wait()
    assert holder(run_dir) is None  # the kernel dropped the dead process's flock
    lock = RunLock(run_dir)
    stale = lock.acquire()
    assert stale is not None and stale.pid == proc.pid  # taken over, and whose it was is reported
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (run_dir / "run.lock").read_text() == ""  # a clean release leaves nothing stale
    with RunLock(run_dir) as again:
        assert again.path.is_file()


def test_a_used_run_dir_accepts_only_a_resume_of_its_own_checkpoints(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    check_one_run(tmp_path / "run", [ckpts], None)  # nothing there yet
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_text("")
    with pytest.raises(RunDirUsed, match=r"\(checkpoints: last.ckpt\).*--ckpt_path last.*--run_dir"):
        check_one_run(tmp_path / "run", [ckpts], None)
    check_one_run(tmp_path / "run", [ckpts], "last")
    check_one_run(tmp_path / "run", [ckpts], str(ckpts / "last.ckpt"))
    (tmp_path / "other.ckpt").write_text("")
    with pytest.raises(RunDirUsed, match="another run's checkpoint"):
        check_one_run(tmp_path / "run", [ckpts], str(tmp_path / "other.ckpt"))


# ---------------------------------------------------------------------------- fit
@pytest.fixture
def in_tmp(tmp_path, tmp_path_factory, monkeypatch):
    """As tests/test_configs.py: runs/ inside tmp_path, the tiny synthetic set shared."""
    shared = tmp_path_factory.getbasetemp().parent / "test-synth"
    shared.mkdir(exist_ok=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "test-synth").symlink_to(shared, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["experiments.fit"])
    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    return tmp_path


def _fit_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO), "--config", str(TINY), "--config", str(RESUME), "--run_dir", str(run_dir),
            "--trainer.enable_model_summary", "false", *extra]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_fit_refuses_a_run_dir_another_process_holds(in_tmp, capsys):
    from experiments.fit import main

    run_dir = in_tmp / "run"
    proc = _holding(run_dir)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(_fit_args(run_dir, "--trainer.max_steps", "1"))
    finally:
        proc.kill()
        proc.wait()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"run dir {run_dir} is in use by pid {proc.pid}" in err and "Traceback" not in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "csv").exists()  # nothing written


def test_a_new_run_into_a_used_run_dir_is_refused_and_a_resume_keeps_the_earlier_log_rows(in_tmp, capsys):
    """Run 1 stops after 3 of 6 steps (checkpoints every step). The same command again is a new
    run over it: refused, naming `--ckpt_path last` and `--run_dir`, with no `last-v1.ckpt`.
    `--ckpt_path last` resumes: metrics.csv holds steps 0-5, the first three from run 1."""
    from experiments.fit import main

    run_dir = in_tmp / "run"
    main(_fit_args(run_dir, "--trainer.callbacks+=callbacks.stop.StopAfterSteps", "--trainer.callbacks.steps=3"))
    before = {int(r["step"]): r["train/loss"] for r in _rows(run_dir) if r.get("train/loss")}
    assert sorted(before) == [0, 1, 2]
    assert holder(run_dir) is None  # released at the end of fit

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(_fit_args(run_dir))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"run dir {run_dir} already holds a run (checkpoints: " in err
    assert "--ckpt_path last" in err and "--run_dir" in err
    assert not list(run_dir.rglob("last-v1.ckpt"))

    main(_fit_args(run_dir, "--ckpt_path", "last"))
    after = {int(r["step"]): r["train/loss"] for r in _rows(run_dir) if r.get("train/loss")}
    assert sorted(after) == list(range(6))  # each step once: none lost, none twice
    assert {s: after[s] for s in before} == before
    assert not list(run_dir.rglob("last-v1.ckpt"))


# ---------------------------------------------------------------------------- grid
FAKE_FIT = """\
import os, sys, time
from pathlib import Path

args = sys.argv[1:]
run_dir = Path(args[args.index("--run_dir") + 1])
(run_dir / "pid").write_text(str(os.getpid()))
time.sleep(120)
"""

GRID = """\
import sys
from experiments import grid
grid.FIT = [sys.executable, sys.argv[1]]
grid.main(sys.argv[2:])
"""


def _grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(f"base: [{DEMO}, {TINY}]\naxes: [{{name: f, values: [{{label: a}}]}}]\n")
    return path


def _start_grid(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """A grid (its own process) whose one run is a hanging stand-in for fit -> (grid, run's pid)."""
    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    (tmp_path / "grid.py").write_text(GRID)
    out = tmp_path / "out"
    grid = subprocess.Popen([sys.executable, str(tmp_path / "grid.py"), str(tmp_path / "fake_fit.py"),
                             str(_grid_file(tmp_path)), "--out", str(out), *extra],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (out / "a" / "pid").is_file() or not (out / "a" / "pid").read_text():
        assert time.monotonic() < deadline and grid.poll() is None, "the run did not start"
        time.sleep(0.05)
    return grid, int((out / "a" / "pid").read_text())


@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detached"])
def test_killing_the_grid_stops_its_runs_unless_detached(tmp_path, detach):
    grid, pid = _start_grid(tmp_path, *(["--detach"] if detach else []))
    try:
        os.kill(grid.pid, signal.SIGKILL)  # no handler runs: only the kernel can stop the run
        grid.wait()
        if detach:
            time.sleep(1.0)
            assert not _gone(pid), "a detached run stopped with the grid"
        else:
            assert _wait_gone(pid, 5.0), "the run outlived the grid"
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_grid_does_not_start_a_run_that_a_live_process_holds(tmp_path, monkeypatch):
    from experiments import grid as grid_module
    from experiments.grid import load_grid, run_grid

    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    monkeypatch.setattr(grid_module, "FIT", [sys.executable, str(tmp_path / "fake_fit.py")])
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    proc = _holding(out / "a")  # e.g. the run of an earlier grid, started --detach
    try:
        buf = io.StringIO()
        (result,) = run_grid(load_grid(_grid_file(tmp_path)), out, console=Console(file=buf, width=200))
    finally:
        proc.kill()
        proc.wait()
    assert result.status == "running", buf.getvalue()
    assert f"a: running (pid {proc.pid} on " in buf.getvalue()
    assert not (out / "a" / "pid").exists() and not (out / "a" / "fit.log").exists()  # not started, nothing touched


# ---------------------------------------------------------------------------- bench
def test_benchmarks_write_under_runs_unless_told_otherwise(monkeypatch):
    from experiments import bench

    seen = []
    monkeypatch.setattr(bench, "run_suite", lambda name, quick, out_dir, options: seen.append(out_dir) or {"suite": name})
    monkeypatch.setattr(bench, "print_tables", lambda result: None)
    assert bench.main(["step", "--quick"]) == 0
    assert bench.main(["step", "--quick", "--out-dir", "docs/img"]) == 0
    assert seen == ["runs/bench", "docs/img"]
