"""Run a command that stops when the process that started it dies: how a grid's runs die with
the grid, however the grid dies (Ctrl-C, `kill`, `kill -9`, the OOM killer, a closed terminal).

    python -m experiments.tether PARENT_PID SIGNAL -- COMMAND [ARG...]

asks Linux to send SIGNAL to this process when its parent exits (`prctl(PR_SET_PDEATHSIG)`),
checks that its parent is still PARENT_PID (the parent may have died before the request was
made: then it exits at once with 128 + SIGNAL), and replaces itself with COMMAND (`execvp`:
same pid, the death signal survives exec). The grid gives SIGTERM, on which Lightning stops
at the next batch and a DDP rank zero stops its other ranks.

Why not `preexec_fn` in the grid: it runs between fork and exec in a process with threads
(rich's progress refresh), which Python documents as unsafe. Why not the grid's process group:
a grid's runs live in their own session so that a Ctrl-C at the terminal reaches the grid alone,
which then stops each run once (a second SIGINT would cut Lightning's clean shutdown short); and
a SIGKILL of the grid reaches no group anyway.

The death signal is sent when the *thread* that started the child exits: the grid starts its
runs from its main thread. Linux only; elsewhere `command` returns the plain command (runs then
outlive a killed grid, as detached runs do).
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def supported() -> bool:
    return sys.platform.startswith("linux")


def command(cmd: list[str], sig: int = signal.SIGTERM, parent: int | None = None) -> list[str]:
    """`cmd` wrapped so that it receives `sig` when `parent` (default: this process) dies."""
    if not supported():
        return list(cmd)
    return [sys.executable, "-m", "experiments.tether", str(parent or os.getpid()), str(int(sig)), "--", *cmd]


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: python -m experiments.tether PARENT_PID SIGNAL -- COMMAND [ARG...]")
    parent, sig, cmd = int(argv[0]), int(argv[1]), argv[3:]
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        sys.exit(f"experiments.tether: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # the parent died before the request: nobody would signal us
        sys.exit(128 + sig)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
