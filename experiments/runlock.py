"""One run per run directory, written by one process.

`RunLock`: one writer, `RUN_DIR/run.lock`, held by the process that trains there.
`check_one_run`: one run, a new run is not started over the checkpoints of an earlier one.

Two `experiments.fit` processes on one run directory would both write `last.ckpt`, the logs and
`metrics.json` (a grid re-run while the first grid's runs still train, a user re-running a
command in a second terminal). The lock is an exclusive `flock` on `RUN_DIR/run.lock`, whose
text names its owner (pid, host, start time, command), so that a refusal can say who holds it:

    with RunLock(run_dir):     # RunLocked when a live process holds it
        trainer.fit(...)

Why `flock` and not a pid file alone: the kernel drops a process's flock when the process dies,
however it dies (SIGKILL, OOM killer, a node reboot for the NFS server), so a lock left by a dead
run is never mistaken for a live one, and a pid reused by an unrelated process does not keep a
run directory locked. On NFS, Linux implements flock with the server's byte-range locks, so it
holds across hosts. The owner's text stays in the file after a crash: the next owner takes the
lock over and reports whose it was (`RunLock.acquire` returns that stale `Owner`); a clean
release empties the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "run.lock"
WAIT_S = 1.0
"""How long `acquire` retries before it refuses: `holder` probes the lock with a shared flock
for a moment (the grid deciding whether a run is live), which must not make a starting run fail."""


@dataclass(frozen=True)
class Owner:
    """Who holds (or held) a run directory's lock."""

    pid: int
    host: str
    started: str  # local time, "%Y-%m-%d %H:%M:%S"
    command: str = ""

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.pid else "a process"
        return f"{who} on {self.host}, started {self.started}" + (f": {self.command}" if self.command else "")


class RunLocked(RuntimeError):
    """A live process holds the run directory's lock."""

    def __init__(self, run_dir: Path, owner: Owner | None):
        self.run_dir, self.owner = run_dir, owner
        who = owner.describe() if owner else "a process that has not written its name yet"
        super().__init__(f"run dir {run_dir} is in use by {who}; wait for it to finish or stop it "
                         f"(kill {owner.pid if owner else '<pid>'}), or train into another --run_dir")


def _read_owner(f) -> Owner | None:
    f.seek(0)
    try:
        return Owner(**json.loads(f.read() or "null"))
    except (TypeError, ValueError):  # empty (released cleanly, or being written) or not ours
        return None


class RunLock:
    """The exclusive lock of one run directory (created if missing). Not re-entrant: a second
    `RunLock` on the same directory conflicts, in this process too (flock is per open file)."""

    def __init__(self, run_dir: str | Path, wait_s: float = WAIT_S):
        self.run_dir, self.path, self.wait_s = Path(run_dir), Path(run_dir) / LOCK_NAME, wait_s
        self._file = None

    def acquire(self) -> Owner | None:
        """Take the lock and write our name in it -> the stale owner it took over (a process
        that died holding it), or None. RunLocked naming the live owner otherwise."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # a+: created if missing, never truncated before we hold it
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    f.close()
                    raise
                if time.monotonic() >= deadline:
                    owner = _read_owner(f)
                    f.close()
                    raise RunLocked(self.run_dir, owner) from None
                time.sleep(0.05)
        stale = _read_owner(f)
        me = Owner(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"),
                   shlex.join([Path(sys.executable).name, *sys.argv])[:500])
        f.seek(0)
        f.truncate()
        f.write(json.dumps(asdict(me)))
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        return stale

    def release(self) -> None:
        """Empty the file (a clean end: nothing stale to report) and drop the lock."""
        if self._file is None:
            return
        f, self._file = self._file, None
        f.truncate(0)
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_dir: str | Path) -> Owner | None:
    """The live owner of a run directory's lock, None when no process holds it. A shared flock
    probes without waiting; a starting run retries past it (WAIT_S)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        f = open(path)
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            # held, its text not written yet (the owner is between flock and write): still live
            return _read_owner(f) or Owner(0, "an unknown host", "just now")
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


# ---------------------------------------------------------------------------- one run per run dir
RESUME_NAMES = ("last", "hpc", "best", "registry")
"""`--ckpt_path` values Lightning resolves itself, from the run's own checkpoint callbacks."""


class RunDirUsed(ValueError):
    """A new run was pointed at a run directory that already holds one."""


def check_one_run(run_dir: str | Path, checkpoint_dirs: list[str | Path], ckpt_path: str | None) -> None:
    """RunDirUsed, naming the ways out, when a run would start over in a run directory that holds
    checkpoints or a finished metrics.json: a new run there would write `last-v1.ckpt` beside the
    old `last.ckpt` (which `evaluate`/`stream`/`export` would go on reading) and replace the old
    run's metrics.json. Resuming this run's own checkpoints (`--ckpt_path last`, or a file in its
    checkpoint directory) is what a used run directory is for; another run's checkpoint would
    also end in last-v1.ckpt (ModelCheckpoint restores its state only from its own directory)."""
    run_dir = Path(run_dir)
    ckpts = [p for d in {Path(d) for d in checkpoint_dirs} | {run_dir} if d.is_dir()
             for p in (d.rglob("*.ckpt") if d == run_dir else d.glob("*.ckpt"))]
    dirs = {p.parent.resolve() for p in ckpts} | {Path(d).resolve() for d in checkpoint_dirs}
    found = sorted({p.name for p in ckpts})
    finished = (run_dir / "metrics.json").is_file()
    if not found and not finished:
        return
    if ckpt_path is not None:
        if ckpt_path in RESUME_NAMES or ckpt_path.startswith("registry:"):
            return
        if Path(ckpt_path).resolve().parent in dirs:
            return
    what = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    what = "; ".join(x for x in ((f"checkpoints: {what}" if found else ""), "metrics.json" if finished else "") if x)
    how = ("resume it with --ckpt_path last" if found else
           "its checkpoints are gone, so it cannot be resumed") + "; or start this run in a new --run_dir (or delete the old one)"
    start = "a new run" if ckpt_path is None else f"a run from {ckpt_path}, another run's checkpoint,"
    raise RunDirUsed(f"run dir {run_dir} already holds a run ({what}); {start} would write beside it "
                     f"(last-v1.ckpt, a new metrics.json): {how}")
