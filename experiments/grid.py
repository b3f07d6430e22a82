"""Ablation grids: `python -m experiments.grid GRID.yaml [--jobs N] [--dry-run] [--only NAME...] [--out DIR]`.

A grid file (`experiments.grid_spec`, docs/grids.md; the paper's Tables 6a and 7 are in
experiments/grids/) names base configs, common overrides and axes of labelled changes.
Every combination (the cartesian product of the axes) is one run, executed as its own
process exactly as a user would run it:

    python -m experiments.fit --config BASE.. --config VALUE_CONFIGS.. --KEY VALUE.. --run_dir OUT/NAME

with its output streamed to OUT/NAME/fit.log. A run whose OUT/NAME/metrics.json says
`finished` is skipped; a failed run is recorded with its log and the grid goes on. A run
dir with checkpoints/last.ckpt but no finished metrics.json (interrupted, preempted) resumes
with `--ckpt_path last`. `--jobs N` runs up to N at once, each with its own GPUs
(CUDA_VISIBLE_DEVICES) or its share of the CPU threads (OMP_NUM_THREADS); Ctrl-C stops
them all with one SIGINT each (Lightning's clean shutdown) and leaves them resumable, and a
grid that dies otherwise (`kill -9`) takes its runs with it (SIGTERM, `experiments.tether`)
unless `--detach` started them to outlive it. A run dir that a live process holds
(`experiments.runlock`) is reported as running and not started twice.
OUT/results.md and OUT/results.csv hold the validation metrics per group, the peak memory
and the median step time of every run of the grid. A grid with `aggregate: AXIS` (an axis of
repeats, e.g. seeds) also gets, per combination of the other axes, mean ± sample std over
the finished runs of that axis: a second table in results.md and OUT/results_mean.csv.
Contrasts the grid file declares (`compare:`, `margin:`) are paired by seed and by item from
each run's per-item answers and judged together (`experiments.grid_stats`): a third table and
OUT/results_contrasts.csv; an `answer prior` row gives chance from the training answers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from experiments import grid_stats, runlock, tether
from experiments.grid_spec import Grid, GridError, Run, load_grid, select

__all__ = ["Grid", "GridError", "Result", "Run", "load_grid", "main", "run_grid", "select"]

METRICS = ("exact_match", "relaxed_accuracy", "anls")


@dataclass
class Result:
    run: Run
    status: str  # "finished" (ran now), "skipped" (finished earlier), "failed", "pending" (not run yet), "running" (elsewhere)
    run_dir: Path
    exit_code: int | None = None
    seconds: float | None = None
    summary: dict = field(default_factory=dict)  # metrics.json

    @property
    def log(self) -> Path:
        return self.run_dir / "fit.log"

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary.get("metrics", {})

    @cached_property
    def peak_memory_bytes(self) -> float | None:
        peak = self.summary.get("peak_memory_bytes")
        if peak is None:  # metrics.json from before fit recorded it: the last logged interval
            peak = self.metrics.get("memory/peak_allocated_bytes", self.metrics.get("memory/peak_rss_bytes"))
        return peak

    def value(self, column: str) -> float | None:
        """A results column of this run: `peak_memory_bytes`, `step_time_s` or a metric key."""
        return getattr(self, column) if column in ("peak_memory_bytes", "step_time_s") else self.metrics.get(column)

    @cached_property
    def step_time_s(self) -> float | None:
        """Median of the logged `train/step_time_s` (every log_every_n_steps), else the last step's."""
        times = []
        for path in self.run_dir.rglob("metrics.csv"):
            with open(path, newline="") as f:
                times += [float(r["train/step_time_s"]) for r in csv.DictReader(f) if r.get("train/step_time_s")]
        return statistics.median(times) if times else self.metrics.get("train/step_time_s")


# ---------------------------------------------------------------------------- running
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _last_line(log: Path, width: int = 70) -> str:
    """The last non-empty line of a log (progress bars rewrite lines with \\r)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [s.strip() for s in re.split(r"[\r\n]", _ANSI.sub("", tail)) if s.strip()]
    return lines[-1][:width] if lines else ""


FIT = [sys.executable, "-m", "experiments.fit"]  # the command of one run (tests swap in a stand-in)
GRACE_S = 60.0  # how long an interrupted run may take to stop before it is killed


@dataclass
class _Launched:
    """A run's fit process while it runs."""

    run: Run
    run_dir: Path
    label: str
    args: list[str]  # the grid's arguments of the run, as recorded in grid_run.json
    resumed: bool
    proc: subprocess.Popen
    out: Any  # fit.log, open for the child's output
    start: float


def has_checkpoint(run_dir: Path) -> bool:
    """Whether an interrupted run has something to resume from: any checkpoint, a file or
    FSDP2's directory, not only last.ckpt (`--ckpt_path last` falls back to the newest intact
    one when last.ckpt is damaged or was moved aside; `experiments.fit` refuses a new run into
    a directory that holds checkpoints, so starting over is never the grid's choice)."""
    return any((run_dir / "checkpoints").glob("*.ckpt"))


def _launch(run: Run, run_dir: Path, label: str, env: dict[str, str] | None = None,
            extra: list[str] = (), log: str = "fit.log", detach: bool = False) -> _Launched:
    """Start `experiments.fit` for one combination, its output appended to RUN_DIR/fit.log.

    A run dir holding checkpoints/last.ckpt is an interrupted run (finished ones are skipped
    before): it resumes with `--ckpt_path last` instead of starting over. The child gets its
    own session, so a Ctrl-C at the terminal reaches only the grid, which then stops every
    child once (`_stop`): a second SIGINT would cut Lightning's own clean shutdown short.
    The child also gets SIGTERM when the grid dies by any other means (`experiments.tether`:
    `kill -9` of the grid leaves no orphan training), unless `detach` starts it to outlive the grid.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if log == "fit.log":  # not by the other tasks of a multi-task SLURM run
        (run_dir / "metrics.json").unlink(missing_ok=True)  # an earlier attempt's must not pass for this one's
    args = run.args(run_dir)
    resumed = has_checkpoint(run_dir)
    cmd_args = [*args, *extra] + (["--ckpt_path", "last"] if resumed else [])
    out = open(run_dir / log, "a" if resumed else "w")
    out.write(("\n" if resumed else "") + f"$ python -m experiments.fit {shlex.join(cmd_args)}\n\n")
    out.flush()
    cmd = [*FIT, *cmd_args] if detach else tether.command([*FIT, *cmd_args])
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **dict(run.env), **(env or {}), "PYTHONUNBUFFERED": "1",
                                 # logged as hyperparameters (TensorBoard HParams), by experiments.fit
                                 "CASA_GRID_HPARAMS": json.dumps({"run": run.name, **run.labels})})
    if log == "fit.log":  # what `--status` reads while the run is going
        _record(run_dir, state="running", args=args, resumed=resumed, host=socket.gethostname(), pid=proc.pid)
    return _Launched(run, run_dir, label, args, resumed, proc, out, time.monotonic())


def _record(run_dir: Path, **fields) -> None:
    """RUN_DIR/grid_run.json: the run's state as the grid last knew it (`--status` reads it):
    queued (submitted to SLURM), running (host, pid), finished or failed (exit code)."""
    (run_dir / "grid_run.json").write_text(json.dumps(fields, indent=1))


def _collect(job: _Launched) -> Result:
    """The Result of a fit process that has exited; records RUN_DIR/grid_run.json."""
    job.out.close()
    seconds = time.monotonic() - job.start
    summary = _read_json(job.run_dir / "metrics.json")
    code = job.proc.returncode
    ok = code == 0 and summary.get("finished") is True
    _record(job.run_dir, state="finished" if ok else "failed", args=job.args, resumed=job.resumed, exit_code=code,
            seconds=round(seconds, 1), finished=ok, **({"failure": summary["failure"]} if summary.get("failure") else {}))
    return Result(job.run, "finished" if ok else "failed", job.run_dir, code, seconds, summary)


def _stop(jobs: list[_Launched], detach: bool = False) -> None:
    """Interrupt every running fit once (SIGINT: Lightning stops cleanly, checkpoints stay),
    wait up to GRACE_S for them all, then kill the rest; no training process is left behind.
    Detached runs (`--detach`) are left running: they were started to outlive the grid."""
    if detach:
        for job in jobs:
            job.out.close()
        return
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + GRACE_S
    for job in jobs:
        try:
            job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
        job.out.close()


def _gpu_ids() -> list[str]:
    """The GPUs runs may use: CUDA_VISIBLE_DEVICES when set, else every GPU torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch  # only here: the grid itself does not need torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(jobs: int) -> list[dict[str, str]]:
    """The environment of each of `jobs` concurrent runs: its own GPUs (CUDA_VISIBLE_DEVICES,
    the GPUs split into `jobs` equal blocks; with fewer GPUs than jobs, runs share them round
    robin), else its share of the CPU cores as OMP/MKL threads (torch's intra-op pool)."""
    gpus = _gpu_ids()
    if gpus:
        per = len(gpus) // jobs
        blocks = [gpus[i * per:(i + 1) * per] for i in range(jobs)] if per else \
            [[gpus[i % len(gpus)]] for i in range(jobs)]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(b)} for b in blocks]
    threads = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(jobs)]


def execute(run: Run, run_dir: Path, label: str, console, detach: bool = False) -> Result:
    """Run `experiments.fit` for one combination in its own process, output to RUN_DIR/fit.log."""
    from rich.progress import Progress

    with Progress(*_progress_columns(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        job = _launch(run, run_dir, label, detach=detach)
        task = progress.add_task(label, last="")
        try:
            while job.proc.poll() is None:
                progress.update(task, last=_last_line(run_dir / "fit.log"))
                time.sleep(0.5)
        except BaseException:  # interrupted: leave no training process behind, resumable
            _stop([job], detach)
            raise
    return _collect(job)


def _progress_columns():
    """One live line per run: spinner, run, elapsed time, the log's last line (cut to fit)."""
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column

    return (SpinnerColumn(), TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            TimeElapsedColumn(), TextColumn("[dim]{task.fields[last]}", table_column=Column(no_wrap=True, ratio=1)))


def execute_parallel(todo: list[tuple[Run, Path, str]], jobs: int, console, done, detach: bool = False) -> None:
    """Run the (run, run_dir, label) triples, up to `jobs` at once, each in its device slot;
    `done(result)` as each ends (in completion order). A failed run frees its slot for the
    next; Ctrl-C (or SIGTERM) stops every running fit cleanly (`_stop`) and re-raises."""
    from rich.progress import Progress

    free = device_slots(jobs)
    queue = list(todo)
    running: dict[int, tuple[_Launched, dict, Any]] = {}  # slot index -> (job, its env, task)
    with Progress(*_progress_columns(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        try:
            while queue or running:
                for i, env in enumerate(free):
                    if queue and i not in running:
                        run, run_dir, label = queue.pop(0)
                        job = _launch(run, run_dir, label, env, detach=detach)
                        running[i] = (job, env, progress.add_task(label, last=""))
                for i, (job, _, task) in list(running.items()):
                    if job.proc.poll() is None:
                        progress.update(task, last=_last_line(job.run_dir / "fit.log"))
                        continue
                    progress.remove_task(task)
                    del running[i]
                    done(_collect(job))
                time.sleep(0.5)
        except BaseException:
            _stop([job for job, _, _ in running.values()], detach)
            raise


# ---------------------------------------------------------------------------- submitit
LAUNCHERS = ("local", "slurm", "submitit-local")


class FitJob:
    """One run as a submitit job: the job process starts `experiments.fit` (as `_launch` does
    locally) and returns its Result. In a SLURM job of nodes x GPUs tasks, every task runs
    this; fit sees SLURM_* and Lightning's SLURM environment joins them into one DDP/FSDP2
    run. Task 0 writes fit.log and grid_run.json, the others fit.task<N>.log. On preemption
    or timeout submitit calls `checkpoint`: the job is requeued and, finding last.ckpt,
    resumes with `--ckpt_path last`."""

    def __init__(self, run: Run, run_dir: Path, label: str, extra: list[str] = ()):
        self.run, self.run_dir, self.label, self.extra = run, run_dir, label, list(extra)

    def __call__(self) -> Result:
        task = int(os.environ.get("SLURM_PROCID", "0"))
        job = _launch(self.run, self.run_dir, self.label, extra=self.extra,
                      log="fit.log" if task == 0 else f"fit.task{task}.log")
        try:
            job.proc.wait()
        except BaseException:  # submitit's timeout/preemption signal: stop fit, keep its checkpoints
            _stop([job])
            raise
        return _collect(job) if task == 0 else Result(self.run, "finished", self.run_dir, job.proc.returncode)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(FitJob(self.run, self.run_dir, self.label, self.extra))


def slurm_parameters(grid: Grid, name: str) -> dict[str, Any]:
    """The sbatch parameters (submitit's SLURM names) of every run of the grid."""
    s = grid.slurm
    tasks = max(1, s.gpus_per_node)  # one task per GPU, as Lightning's SLURM environment expects
    params = {"job_name": name, "partition": s.partition, "account": s.account, "nodes": s.nodes,
              "ntasks_per_node": tasks, "gpus_per_node": s.gpus_per_node or None, "cpus_per_task": s.cpus_per_task,
              "time": s.time, "additional_parameters": dict(s.additional) or None}
    return {k: v for k, v in params.items() if v is not None}


def fit_extra(grid: Grid) -> list[str]:
    """Trainer arguments a SLURM run needs beyond the grid's: its nodes and devices per node
    (Lightning checks them against the SLURM tasks)."""
    s = grid.slurm
    return ["--trainer.num_nodes", str(s.nodes), "--trainer.devices", str(s.gpus_per_node)] if s.gpus_per_node else []


def make_executor(launcher: str, grid: Grid, folder: Path):
    """submitit's AutoExecutor for `slurm` (sbatch, one job per run in a job array) or
    `submitit-local` (the same job pickles run as local subprocesses)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if launcher == "slurm" else "local")
    params = slurm_parameters(grid, f"grid-{grid.path.stem}")
    executor.update_parameters(timeout_min=grid.slurm.time, name=params["job_name"],
                               **{f"slurm_{k}": v for k, v in params.items() if k not in ("time", "job_name")})
    return executor


def sbatch_script(grid: Grid, folder: Path) -> str:
    """The sbatch script `--launcher slurm` submits (what submitit writes), for review."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = shlex.join([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(grid, f"grid-{grid.path.stem}"))


def execute_submitit(todo: list[tuple[Run, Path, str]], executor, extra: list[str], console, done) -> None:
    """Submit every run as one job of a job array and report each as it ends. Ctrl-C cancels
    the jobs still queued or running (their run dirs resume on the next invocation)."""
    # pickled by reference: under `python -m experiments.grid` this module is __main__, whose
    # classes cloudpickle would copy by value (with unpicklable module state)
    from experiments.grid import FitJob

    with executor.batch():
        jobs = [(run, run_dir, executor.submit(FitJob(run, run_dir, label, extra))) for run, run_dir, label in todo]
    for run, run_dir, job in jobs:
        run_dir.mkdir(parents=True, exist_ok=True)
        if _read_json(run_dir / "grid_run.json").get("state") != "running":  # a fast job may have started
            _record(run_dir, state="queued", args=run.args(run_dir), job_id=str(job.job_id))
    console.print(f"submitted {len(jobs)} job{'s' * (len(jobs) != 1)}: "
                  f"{', '.join(str(j.job_id) for _, _, j in jobs)} (logs: {executor.folder})", soft_wrap=True)
    pending = list(jobs)
    try:
        while pending:
            for item in list(pending):
                run, run_dir, job = item
                if not job.done():
                    continue
                pending.remove(item)
                try:
                    result = job.result()
                except Exception as e:  # the job itself failed (not fit): killed, out of time, ...
                    console.print(f"[red]{run.name}: job {job.job_id} failed: {str(e).splitlines()[0]}", soft_wrap=True)
                    result = Result(run, "failed", run_dir, None, None, _read_json(run_dir / "metrics.json"))
                done(result)
            time.sleep(1.0)
    except BaseException:
        for _, _, job in pending:
            job.cancel(check=False)
        raise


def previous(run: Run, run_dir: Path) -> Result | None:
    """The result of an earlier invocation if that run finished, else None."""
    summary = _read_json(run_dir / "metrics.json")
    if summary.get("finished") is not True:
        return None
    record = _read_json(run_dir / "grid_run.json")
    return Result(run, "skipped", run_dir, record.get("exit_code"), record.get("seconds"), summary)


def run_grid(grid: Grid, out: Path, only: list[str] | None = None, dry_run: bool = False,
             metric: str = "relaxed_accuracy", console=None, jobs: int = 1, launcher: str = "local",
             detach: bool = False) -> list[Result]:
    """Run (or with dry_run, list) the selected combinations, up to `jobs` at once; return
    their results in grid order.

    The results tables always cover the whole grid: runs not selected (or not reached yet)
    appear with their earlier results, or as "pending". A run whose directory a live process
    holds (`experiments.runlock`: an earlier grid's detached run, a fit started by hand) is
    reported as "running" and not started a second time. `detach` starts the runs so that
    they outlive the grid (Ctrl-C, `kill -9`); otherwise they stop with it.
    """
    from rich.console import Console
    from rich.markup import escape

    if jobs < 1:
        raise GridError(f"--jobs: {jobs} must be at least 1")
    if launcher not in LAUNCHERS:
        raise GridError(f"--launcher: {launcher!r} is not one of {list(LAUNCHERS)}")
    if detach and launcher != "local":
        raise GridError(f"--detach is for --launcher local, not {launcher!r}: SLURM jobs already run without the grid")
    # piped to a file, rich would wrap the results table at 80 columns
    console = console or Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    every = grid.runs()
    runs = select(every, only)
    done = {r.name: previous(r, out / r.name) for r in every}
    results: dict[str, Result] = {}

    def table() -> list[Result]:
        return [results.get(r.name) or done[r.name] or Result(r, "pending", out / r.name) for r in every]

    labels = {run.name: f"[{i}/{len(runs)}] {run.name}" for i, run in enumerate(runs, 1)}

    def report(result: Result) -> None:
        label = labels[result.run.name]
        resumed = " (resumed from last.ckpt)" if _read_json(result.run_dir / "grid_run.json").get("resumed") else ""
        took = f"{result.seconds:.0f} s"
        if result.status == "finished":
            loss = result.metrics.get("val/loss")
            loss = "" if loss is None else f", val/loss {loss:.4f}"
            console.print(f"[green]{label}: finished[/]{resumed} in {took}{loss}")
        else:
            why = result.summary.get("failure") or ("exit code 0 but metrics.json does not say finished"
                                                    if result.exit_code == 0 else f"exit code {result.exit_code}")
            console.print(f"[red]{label}: failed[/]{resumed} ({why}) after {took}; log: {result.log}", soft_wrap=True)
        results[result.run.name] = result
        write_results(table(), grid, out, metric)

    n_done = sum(done[r.name] is not None for r in runs)
    console.print(f"[bold]grid {grid.path}[/]: {len(runs)} run{'s' * (len(runs) != 1)} ({n_done} finished earlier) "
                  f"-> {out}" + (f", {jobs} at once" if jobs > 1 else ""), soft_wrap=True)
    todo = []
    for run in runs:
        label, run_dir = labels[run.name], out / run.name
        result = done[run.name]
        if result is not None:
            console.print(f"[dim]{label}: skipped (finished earlier)[/]")
            if _read_json(run_dir / "grid_run.json").get("args", run.args(run_dir)) != run.args(run_dir):
                console.print(f"[yellow]  it ran with other arguments than this grid's; "
                              f"delete {run_dir} to re-run it[/]", soft_wrap=True)
            results[run.name] = result
        elif owner := runlock.holder(run_dir):
            console.print(f"[cyan]{label}: running ({owner.describe()}), not started again[/]", soft_wrap=True)
            results[run.name] = Result(run, "running", run_dir)
        elif dry_run:
            resume = ["--ckpt_path", "last"] if has_checkpoint(run_dir) else []
            extra = fit_extra(grid) if launcher == "slurm" else []
            console.print(f"{label}: would run\n  python -m experiments.fit "
                          f"{escape(shlex.join(run.args(run_dir) + extra + resume))}", soft_wrap=True)
            results[run.name] = Result(run, "pending", run_dir)
        else:
            todo.append((run, run_dir, label))
    if dry_run and launcher == "slurm":
        console.print(f"sbatch script of each run ({out / 'submitit'}):", soft_wrap=True)
        console.print(escape(sbatch_script(grid, out / "submitit")), soft_wrap=True, highlight=False)
    if not dry_run:
        if launcher != "local" and todo:
            executor = make_executor(launcher, grid, out / "submitit")
            extra = fit_extra(grid) if launcher == "slurm" else []
            execute_submitit(todo, executor, extra, console, report)
        elif jobs > 1 and len(todo) > 1:
            execute_parallel(todo, jobs, console, report, detach)
        else:
            for run, run_dir, label in todo:
                report(execute(run, run_dir, label, console, detach))
        write_results(table(), grid, out, metric)  # also when every run was skipped
        prior = grid_stats.answer_prior(table(), metric)
        console.print(results_table(table(), grid, metric, prior))
        written = [out / "results.md", out / "results.csv"]
        if grid.aggregate:
            console.print(mean_table(table(), grid, metric, prior))
            written.append(out / "results_mean.csv")
        if grid.contrasts:
            console.print(contrasts_table(grid_stats.grid_contrasts(table(), grid, metric), grid, metric))
            written.append(out / "results_contrasts.csv")
        if plot := write_plot(table(), grid, out, metric):
            written.append(plot)
        console.print(f"written: {', '.join(map(str, written))}", soft_wrap=True)
    return [results[r.name] for r in runs]


# ---------------------------------------------------------------------------- status
def _last_step(run_dir: Path) -> int | None:
    """The last training step a run logged (its CSV logs) or checkpointed, None before any."""
    steps = []
    for path in run_dir.rglob("metrics.csv"):
        with open(path, newline="") as f:
            steps += [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]
    steps += [int(m.group(1)) for p in run_dir.glob("checkpoints/*.ckpt") if (m := re.search(r"step=(\d+)", p.name))]
    return max(steps) if steps else None


def _alive(record: dict) -> bool:
    """Whether a `running` record's process still runs; on another host it is taken on trust."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False
    return True


def run_state(run_dir: Path) -> tuple[str, str]:
    """(state, detail) of one run from its run dir alone: finished, failed (its last log
    line), running (its step), queued (its SLURM job), interrupted (resumes from last.ckpt
    or starts over) or pending (never started)."""
    summary, record = _read_json(run_dir / "metrics.json"), _read_json(run_dir / "grid_run.json")
    log = _last_line(run_dir / "fit.log", 100)
    if summary.get("finished") is True:
        loss = summary.get("metrics", {}).get("val/loss")
        return "finished", f"step {summary.get('global_step')}" + ("" if loss is None else f", val/loss {loss:.4f}")
    state = record.get("state")
    if summary.get("failure") and state != "running":  # fit's own verdict: "non-finite loss at step k"
        return "failed", summary["failure"]
    resumable = "resumes from its newest intact checkpoint" if has_checkpoint(run_dir) else "starts over"
    if state == "queued":
        return "queued", f"job {record.get('job_id')}"
    if state == "running" and _alive(record):
        step = _last_step(run_dir)
        return "running", ("starting" if step is None else f"step {step}") + f": {log}"
    if state == "running" or (not record and run_dir.is_dir()):
        return "interrupted", resumable
    if record:
        return "failed", f"exit code {record.get('exit_code')}: {log}"
    return "pending", ""


def status_table(grid: Grid, out: Path):
    """A rich table of every run's state (`--status`)."""
    from rich.markup import escape
    from rich.table import Table

    colors = {"finished": "green", "failed": "red", "running": "cyan", "queued": "blue", "interrupted": "yellow"}
    table = Table(title=f"{grid.path.stem}: {out}")
    for h in ("run", "state", "detail"):
        table.add_column(h, no_wrap=h != "detail")
    for run in grid.runs():
        state, detail = run_state(out / run.name)
        table.add_row(run.name, f"[{colors.get(state, 'dim')}]{state}[/]", escape(detail))
    return table


# ---------------------------------------------------------------------------- results
def _groups(results: list[Result]) -> list[str]:
    return sorted({k.split("/")[1] for r in results for k in r.metrics if k.startswith("val_group/")})


def _extra_columns(results: list[Result]) -> list[str]:
    """Metrics shown as they are beside val/loss when any run has them: the held-out text
    perplexities (`val_ppl/<task>`, `CasaModule.perplexity_groups`)."""
    return sorted({k for r in results for k in r.metrics if k.startswith("val_ppl/")})


def mean_group_score(metrics: dict[str, float], groups, metric: str) -> float | None:
    """The mean of `metric` over the `groups` a run's metrics have (the table's "avg"), None
    without any (experiments.claims reads its accuracies through it too)."""
    scores = [metrics[k] for g in groups if (k := f"val_group/{g}/{metric}") in metrics]
    return sum(scores) / len(scores) if scores else None


def _prior_row(header: list[str], groups: list[str], prior: dict[str, float] | None) -> list[list[str]]:
    """The answer prior's row (`experiments.grid_stats.answer_prior`) under a table: its score
    per group and their mean, in %, in the groups' columns; no row without a prior."""
    if not prior:
        return []
    row = [""] * len(header)
    row[0] = grid_stats.PRIOR_ROW
    for g in groups:
        if g in prior:
            row[header.index(g)] = f"{100 * prior[g]:.1f}"
    avg = mean_group_score({f"val_group/{g}/m": v for g, v in prior.items()}, groups, "m")
    row[header.index("avg")] = "" if avg is None else f"{100 * avg:.1f}"
    return [row]


def _columns(results: list[Result], metric: str, prior: dict[str, float] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the human-readable table (one metric per group, in %), the answer
    prior's row last when given."""
    groups, extra = _groups(results), _extra_columns(results)
    header = ["run", "status", "val/loss", *extra, *groups, "avg", "mem (MiB)", "step (s)"]
    rows = []
    for r in results:
        scores = [r.metrics.get(f"val_group/{g}/{metric}") for g in groups]
        avg, loss, peak, step = mean_group_score(r.metrics, groups, metric), r.metrics.get("val/loss"), r.peak_memory_bytes, r.step_time_s
        rows.append([r.run.name, r.status, "" if loss is None else f"{loss:.4f}",
                     *("" if (v := r.metrics.get(k)) is None else f"{v:.3f}" for k in extra),
                     *("" if s is None else f"{100 * s:.1f}" for s in scores),
                     "" if avg is None else f"{100 * avg:.1f}",
                     "" if peak is None else f"{peak / 2 ** 20:,.0f}", "" if step is None else f"{step:.3f}"])
    return header, rows + _prior_row(header, groups, prior)


def _repeats(results: list[Result], grid: Grid) -> list[tuple[str, list[Result], list[Result]]]:
    """Results grouped by their labels on every axis but `grid.aggregate`, in grid order:
    [(the group's name, its runs, its finished runs)]; the name joins the other axes' labels
    with "-"."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        key = "-".join(label for axis, label in r.run.labels.items() if axis != grid.aggregate)
        groups.setdefault(key or "all", []).append(r)
    return [(name, runs, [r for r in runs if r.status in ("finished", "skipped")]) for name, runs in groups.items()]


def _present(runs: list[Result], get) -> list[float]:
    """`get(run)` of the runs that have it."""
    return [v for v in map(get, runs) if v is not None]


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' (sample std, n - 1) of the values present; just the value when n = 1."""
    if not values:
        return ""
    mean = scale * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _mean_columns(results: list[Result], grid: Grid, metric: str,
                  prior: dict[str, float] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the mean ± std table: one row per combination of the other axes,
    over its finished runs (n of them); the answer prior's row last when given."""
    groups, extra = _groups(results), _extra_columns(results)
    others = "-".join(name for name, _ in grid.axes if name != grid.aggregate) or "runs"
    header = [others, "n", "val/loss", *extra, *groups, "avg", "mem (MiB)", "step (s)"]
    rows = []
    for name, runs, done in _repeats(results, grid):
        def present(column):
            return _present(done, lambda r: r.value(column))

        rows.append([name, f"{len(done)}/{len(runs)}", _mean_std(present("val/loss"), digits=4),
                     *(_mean_std(present(k), digits=3) for k in extra),
                     *(_mean_std(present(f"val_group/{g}/{metric}"), 100) for g in groups),
                     _mean_std(_present(done, lambda r: mean_group_score(r.metrics, groups, metric)), 100),
                     _mean_std(present("peak_memory_bytes"), 2 ** -20, 0), _mean_std(present("step_time_s"), digits=3)])
    return header, rows + _prior_row(header, groups, prior)


def _rich_table(title: str, header: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row, style="red" if row[1] == "failed" else None)
    return table


def results_table(results: list[Result], grid: Grid, metric: str, prior: dict[str, float] | None = None):
    return _rich_table(f"{grid.path.stem}: val {metric} per group (%)", *_columns(results, metric, prior))


def mean_table(results: list[Result], grid: Grid, metric: str, prior: dict[str, float] | None = None):
    return _rich_table(f"{grid.path.stem}: mean ± std over {grid.aggregate!r}, val {metric} per group (%)",
                       *_mean_columns(results, grid, metric, prior))


def contrasts_table(contrasts, grid: Grid, metric: str):
    """The declared contrasts (`experiments.grid_stats`), paired by seed and item, in points."""
    margin = "" if grid.margin is None else f", equivalence margin ±{grid.margin:g}"
    return _rich_table(f"{grid.path.stem}: paired contrasts of avg val {metric} (points, Holm over {len(contrasts)}"
                       f"{margin})", grid_stats.CONTRAST_HEADER, grid_stats.contrast_rows(contrasts))


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: two left-aligned label columns, the numbers right-aligned."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def plot_series(results: list[Result], grid: Grid, metric: str) -> tuple[list[str], dict[str, list[tuple]]]:
    """What results.png shows: the x labels (runs; with `aggregate`, the combinations of the
    other axes) and per group [(value or mean, sample std or None)] along them (None
    where a run has no such metric)."""
    groups = _groups(results)
    if grid.aggregate:
        names, series = [], {g: [] for g in groups}
        for name, _, done in _repeats(results, grid):
            names.append(name)
            for g in groups:
                values = _present(done, lambda r: r.metrics.get(f"val_group/{g}/{metric}"))
                series[g].append((statistics.mean(values) if values else None,
                                  statistics.stdev(values) if len(values) > 1 else None))
        return names, series
    return [r.run.name for r in results], {g: [(r.metrics.get(f"val_group/{g}/{metric}"), None) for r in results]
                                           for g in groups}


def write_plot(results: list[Result], grid: Grid, out: Path, metric: str) -> Path | None:
    """OUT/results.png: one bar per group metric and run (mean ± std bars over the
    `aggregate` axis), in %; None when no run has group metrics yet."""
    names, series = plot_series(results, grid, metric)
    if not any(v is not None for values in series.values() for v, _ in values):
        return None
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) * len(series) + 2), 4.2))
    for i, (group, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ys = [float("nan") if v is None else 100 * v for v, _ in values]
        errs = [0.0 if e is None else 100 * e for _, e in values]
        ax.bar(xs, ys, width, yerr=errs if grid.aggregate else None, capsize=3, label=group)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"val {metric} (%)")
    ax.set_title(f"{grid.path.stem}" + (f": mean ± std over {grid.aggregate!r}" if grid.aggregate else ""))
    ax.legend(title="group", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: list[Result], grid: Grid, out: Path, metric: str) -> None:
    """OUT/results.md (one metric per group), OUT/results.csv (every group metric, raw) and,
    with `compare:`, OUT/results_contrasts.csv."""
    prior = grid_stats.answer_prior(results, metric)
    header, rows = _columns(results, metric, prior)
    md = [f"# {grid.path.stem}", "", *([grid.description, ""] if grid.description else []),
          f"`python -m experiments.grid {grid.path}`: val {metric} per group (%) and their mean, "
          "peak memory (RSS on CPU, allocated on CUDA), median training step time.", "",
          *_markdown(header, rows)]
    if grid.aggregate:
        header, rows = _mean_columns(results, grid, metric, prior)
        md += ["", f"Mean ± sample standard deviation over the axis `{grid.aggregate}` (n = finished runs / runs):",
               "", *_markdown(header, rows)]
    if prior:
        md += ["", f"`{grid_stats.PRIOR_ROW}`: the score of always answering each task's most frequent training "
               "answer, on the same evaluation items (chance without the image)."]
    if grid.contrasts:
        contrasts = grid_stats.grid_contrasts(results, grid, metric)
        margin = "no equivalence margin" if grid.margin is None else f"equivalence margin ±{grid.margin:g} points"
        md += ["", f"Paired contrasts of avg val {metric} (points; paired by `{grid.aggregate or 'run'}` and by item; "
               f"95% CI; MDD: the smallest difference detectable at 80% power; Holm over the {len(contrasts)} "
               f"contrasts with data; {margin}; docs/grids.md, Contrasts):", "",
               *_markdown(grid_stats.CONTRAST_HEADER, grid_stats.contrast_rows(contrasts))]
        out.mkdir(parents=True, exist_ok=True)
        grid_stats.write_contrasts_csv(contrasts, out / "results_contrasts.csv")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        md += ["", "Failed runs:", "", *(f"- `{r.run.name}`: " + (f"failed: {r.summary['failure']}, " if r.summary.get("failure") else "")
                                           + f"exit code {r.exit_code}, log `{r.log}`" for r in failed)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(md) + "\n")

    axes = [name for name, _ in grid.axes]
    # every group metric, then the held-out text perplexities (`val_ppl/<task>`), as in results.md
    keys = (sorted({k for r in results for k in r.metrics if k.startswith("val_group/")})
            + _extra_columns(results))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "status", *axes, "global_step", "val/loss", *keys, "peak_memory_bytes",
                         "step_time_s", "seconds", "exit_code", "log"])
        for r in results:
            writer.writerow([r.run.name, r.status, *(r.run.labels[a] for a in axes), r.summary.get("global_step"),
                             r.metrics.get("val/loss"), *(r.metrics.get(k) for k in keys), r.peak_memory_bytes,
                             r.step_time_s, r.seconds, r.exit_code, r.log])
    if grid.aggregate:
        _write_mean_csv(results, grid, out / "results_mean.csv", keys)


def _write_mean_csv(results: list[Result], grid: Grid, path: Path, keys: list[str]) -> None:
    """One row per combination of the other axes: n, then mean and sample std (empty when
    n < 2) of val/loss, every group metric, peak memory and step time, raw units."""
    others = [name for name, _ in grid.axes if name != grid.aggregate]
    columns = ["val/loss", *keys, "peak_memory_bytes", "step_time_s"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*others, "n", *(f"{c}_{stat}" for c in columns for stat in ("mean", "std"))])
        for _, runs, done in _repeats(results, grid):
            row = [runs[0].run.labels[a] for a in others] + [len(done)]
            for c in columns:
                values = _present(done, lambda r: r.value(c))
                row += [statistics.mean(values) if values else None,
                        statistics.stdev(values) if len(values) > 1 else None]
            writer.writerow(row)


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m experiments.grid", description=__doc__.split("\n")[0])
    parser.add_argument("grid", help="grid YAML file")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run names or glob patterns ('casa_*')")
    parser.add_argument("--out", help="output directory (default runs/grids/<grid file name>)")
    parser.add_argument("--metric", default="relaxed_accuracy", choices=METRICS,
                        help="group metric shown in the terminal and Markdown tables (the CSV has all)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs at once on this machine, each with its own GPUs (CUDA_VISIBLE_DEVICES) "
                             "or its share of the CPU threads (default 1)")
    parser.add_argument("--status", action="store_true",
                        help="show every run's state (finished, running at step N, queued, failed, ...) and run nothing")
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS,
                        help="local: subprocesses here (--jobs); slurm: one SLURM job per run through submitit; "
                             "submitit-local: submitit's local executor (the same job pickles, as subprocesses)")
    parser.add_argument("--detach", action="store_true",
                        help="start the runs so that they outlive the grid (Ctrl-C or kill of the grid leaves them "
                             "training; a re-run of the grid skips them while they run); by default they stop with it")
    slurm = parser.add_argument_group("SLURM (--launcher slurm; override the grid file's `slurm:`)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--time", type=int, help="minutes per job")
    args = parser.parse_args(argv)
    # `kill` of the grid unwinds like Ctrl-C, so the running fit process is terminated too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        grid = load_grid(args.grid)
        for key in ("partition", "account", "nodes", "gpus_per_node", "cpus_per_task", "time"):
            if getattr(args, key) is not None:
                setattr(grid.slurm, key, getattr(args, key))
        out = Path(args.out) if args.out else Path("runs/grids") / Path(args.grid).stem
        if args.status:
            from rich.console import Console

            Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160).print(status_table(grid, out))
            return []
        return run_grid(grid, out, args.only, args.dry_run, args.metric, jobs=args.jobs, launcher=args.launcher,
                        detach=args.detach)
    except GridError as e:
        print(f"experiments.grid: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("experiments.grid: interrupted; finished runs are kept, run the grid again to go on "
              + ("(detached runs go on training: --status shows them)" if args.detach else
                 "(interrupted runs resume from their last.ckpt)"), file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(1 if any(r.status == "failed" for r in main()) else 0)
