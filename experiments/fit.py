"""Train a fusion model: `python -m experiments.fit --config experiments/configs/demo.yaml`.

A LightningCLI over `casa.train.module.CasaModule` and any `LightningDataModule` (subclass mode):
components are picked with `class_path`/`init_args`, configs compose
(`--config a.yaml --config b.yaml`) and accept dotted overrides
(`--model.lr_new 3e-4`, `--trainer.max_steps 50`). Wrong values fail at startup with the
field name and the valid choices.

Extra top-level options:
    --synth.out DIR ...   generate the built-in synthetic benchmark there first if missing
    --run_dir DIR         where checkpoints, logs and metrics.json go (default runs/<config name>)
At the end of `fit` a table of the final validation metrics is printed and written to
RUN_DIR/metrics.json (the ablation grid reads it).

A run directory holds one run, written by one process (`experiments.runlock`): rank zero locks
RUN_DIR/run.lock for the whole fit (a second fit there is refused, naming the first), and a new
run into a directory that holds checkpoints or a finished metrics.json is refused with the ways
out (`--ckpt_path last`, or a new --run_dir). A resumed run keeps its earlier CSV log rows
(`casa.train.csv_logger`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from casa.train.cli import CLI_ARGS, RunCLI
from experiments.runlock import RunDirUsed, RunLock, RunLocked, check_one_run


class CasaCLI(RunCLI):
    """The fit CLI: RunCLI's arguments (`casa.train.cli`, which checkpoint readers parse
    run configs with), plus what a training run does before and after fitting."""

    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        if cfg.get("synth"):
            from data.synth import ensure_synth

            s = cfg.synth
            s = s if isinstance(s, dict) else vars(s)
            ensure_synth(s["out"], s["seed"], s["train"], s["val"], s["test"], s["tasks"] or None)
        run_dir = cfg.get("run_dir")
        if run_dir:
            # one place decides where a run writes: loggers and checkpoints follow run_dir
            t = cfg.trainer
            t.default_root_dir = run_dir
            loggers = t.logger if isinstance(t.logger, list) else [t.logger]
            for lg in loggers:
                _set_init_arg(lg, "save_dir", run_dir)
            for cb in t.callbacks or []:
                if str(_get(cb, "class_path")).endswith("ModelCheckpoint"):
                    _set_init_arg(cb, "dirpath", str(Path(run_dir) / "checkpoints"))
        _resumable_csv_logs(cfg.trainer, resume=cfg.get("ckpt_path") is not None)
        add_safety_defaults(cfg.trainer)
        if os.environ.get("CASA_GRID_WANDB"):
            add_wandb_logger(cfg.trainer, json.loads(os.environ["CASA_GRID_WANDB"]), run_dir or cfg.trainer.default_root_dir)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        failure = run_failure(trainer)
        summary = {"metrics": metrics, "global_step": trainer.global_step,
                   "finished": failure is None and trainer.global_step >= (trainer.max_steps or 0),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S"), "peak_memory_bytes": _peak_memory_bytes(trainer),
                   **({"failure": failure} if failure else {})}
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        if os.environ.get("CASA_GRID_HPARAMS") and "val/loss" in metrics:  # the HParams view's metric
            from lightning.pytorch.loggers import TensorBoardLogger

            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.log_metrics({"hp_metric": metrics["val/loss"]}, trainer.global_step)
                    lg.save()
        print_metrics_table(metrics, f"validation after {trainer.global_step} steps ({run_dir})")


def add_safety_defaults(trainer_cfg) -> None:
    """Every run gets a `callbacks.nonfinite.NonFiniteGuard` (a diverged run stops as failed) and
    writes checkpoints through `casa.train.checkpoint_io.AtomicCheckpointIO` (atomic, finite,
    weights_only), unless its config lists its own (to set `max_skips`, list the guard in
    `trainer.callbacks`)."""
    from jsonargparse import Namespace

    callbacks = list(trainer_cfg.callbacks or [])
    if not any(str(_get(cb, "class_path")).endswith("NonFiniteGuard") for cb in callbacks):
        trainer_cfg.callbacks = [*callbacks, Namespace(class_path="callbacks.nonfinite.NonFiniteGuard",
                                                       init_args=Namespace(max_skips=0, check_gradients=True))]
    plugins = trainer_cfg.plugins if isinstance(trainer_cfg.plugins, list) else \
        [] if trainer_cfg.plugins is None else [trainer_cfg.plugins]
    if not any("CheckpointIO" in str(_get(p, "class_path") or p) for p in plugins):
        trainer_cfg.plugins = [*plugins, Namespace(class_path="casa.train.checkpoint_io.AtomicCheckpointIO",
                                                   init_args=Namespace())]


def run_failure(trainer: L.Trainer) -> str | None:
    """Why the run failed though `fit` returned ("non-finite loss at step k"), None if it did not."""
    from callbacks.nonfinite import NonFiniteGuard

    return next((cb.failure for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard) and cb.failure), None)


def _fail(run_dir: Path, why: str, global_step: int) -> None:
    """metrics.json says why the run stopped (the grid reads it), when the disk still takes it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(
            {"finished": False, "failure": why, "global_step": global_step, "metrics": {},
             "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1, sort_keys=True))
    except OSError:
        pass


def _log_grid_hparams(cli: LightningCLI) -> None:
    """A run of `experiments.grid` (CASA_GRID_HPARAMS: its run name and its label on each
    axis) logs the labels with the module's hyperparameters, so the grid's runs compare in
    TensorBoard's HParams view. TensorBoard keeps a run's first HParams session summary, so
    this one replaces Lightning's own (the module's hyperparameters alone) rather than
    following it; `hp_metric` becomes the final val/loss (`after_fit`)."""
    labels = json.loads(os.environ.get("CASA_GRID_HPARAMS") or "{}")
    if not labels:
        return
    cli.model._log_hyperparams = False  # Lightning's own call at fit start would come first
    params = {**cli.model.hparams_initial, **{f"grid/{k}": v for k, v in labels.items()}}
    for lg in cli.trainer.loggers:
        lg.log_hyperparams(params)


def add_wandb_logger(trainer_cfg, spec: dict, run_dir: str | None) -> None:
    """Add Lightning's WandbLogger to the parsed trainer config, beside its own loggers: a grid
    with `wandb:` (experiments.grid_spec.WandbSpec) passes `spec` (project, entity, mode, group =
    the grid's name, tags = the run's labels). The W&B run id is derived from the run directory,
    so a run resumed by the grid (`--ckpt_path last`) continues the same W&B run."""
    from jsonargparse import Namespace

    run_dir = str(Path(run_dir or ".").resolve())
    init = Namespace(project=spec["project"], entity=spec.get("entity"), group=spec["group"], tags=spec["tags"],
                     name=Path(run_dir).name, save_dir=run_dir, offline=spec.get("mode") == "offline",
                     id=hashlib.sha1(run_dir.encode()).hexdigest()[:16], resume="allow")
    logger = Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=init)
    current = trainer_cfg.logger
    if current in (None, True):  # Lightning's default logger, kept beside W&B
        current = [Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                             init_args=Namespace(save_dir=run_dir))]
    elif current is False:
        current = []
    elif not isinstance(current, list):
        current = [current]
    trainer_cfg.logger = [*current, logger]


def _peak_memory_bytes(trainer: L.Trainer) -> int | None:
    """This rank's peak memory over the run, from the MemoryMonitor callback (None without one)."""
    from callbacks.memory import MemoryMonitor

    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, MemoryMonitor)), None)
    return None if monitor is None else monitor.run_peak_bytes(trainer.lightning_module.device)


CSV_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")


def _resumable_csv_logs(trainer_cfg, resume: bool) -> None:
    """Lightning's CSVLogger deletes metrics.csv when its directory is not empty, so a resumed
    run lost its earlier rows: every config's CSVLogger becomes casa's drop-in subclass, told
    whether the run resumes."""
    loggers = trainer_cfg.logger if isinstance(trainer_cfg.logger, list) else [trainer_cfg.logger]
    for lg in loggers:
        if str(_get(lg, "class_path")) in CSV_LOGGERS:
            if isinstance(lg, dict):
                lg["class_path"] = "casa.train.csv_logger.ResumableCSVLogger"
            else:
                lg.class_path = "casa.train.csv_logger.ResumableCSVLogger"
            _set_init_arg(lg, "resume", resume)


def claim_run_dir(cli: CasaCLI) -> RunLock | None:
    """Rank zero takes RUN_DIR's lock (RunLocked when a live process holds it; a lock left by a
    dead one is taken over, with a warning); then every rank checks that a new run does not
    start over a used run dir (RunDirUsed). No run_dir: Lightning's versioned log dirs apply."""
    run_dir = cli.config.get("run_dir")
    if not run_dir:
        return None
    lock = RunLock(run_dir) if cli.trainer.is_global_zero else None
    if lock is not None and (stale := lock.acquire()) is not None:
        print(f"experiments.fit: took over {lock.path} from {stale.describe()}, which is no longer running",
              file=sys.stderr)
    try:
        dirs = [cb.dirpath for cb in cli.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        check_one_run(run_dir, dirs, cli.config.get("ckpt_path"))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _set_init_arg(obj, key: str, value) -> None:
    """Set init_args[key] on a parsed component (a dict or a jsonargparse Namespace)."""
    if obj is None or isinstance(obj, bool):
        return
    init = _get(obj, "init_args")
    if init is None:
        return
    if isinstance(init, dict):
        init[key] = value
    else:
        setattr(init, key, value)


def print_metrics_table(metrics: dict[str, float], title: str) -> None:
    """Rich table: one row per task group / task, one column per answer metric."""
    from rich.console import Console
    from rich.table import Table

    rows: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] in ("val_group", "val_task"):
            rows.setdefault(f"{parts[0][4:]}:{parts[1]}", {})[parts[2]] = v
    table = Table(title=title)
    table.add_column("group / task")
    names = ["exact_match", "relaxed_accuracy", "anls"]
    for n in names:
        table.add_column(n, justify="right")
    # rows with no answer metric (a task scored by its loss only: `perplexity_groups`) are left out
    for key in sorted((r for r in rows if any(n in rows[r] for n in names)), key=lambda r: (not r.startswith("group"), r)):
        table.add_row(key, *(f"{100 * rows[key].get(n, float('nan')):.1f}" for n in names))
    console = Console()
    console.print(table)
    for k in ("val/loss", "train/loss"):
        if k in metrics:
            console.print(f"{k}: {metrics[k]:.4f}")


HALF_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "16-true")


def check_attention_precision(cli: CasaCLI) -> None:
    """Fail at startup (ValueError naming fields, values and choices) when a flash kernel would
    get fp32 inputs, or would run off CUDA: half precision comes from the trainer's precision,
    from FSDP2's `fsdp_param_dtype`, or from the module's own weights (`Backbone.dtype`)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from casa import attention

    users = attention.half_precision_modules(cli.model.model)
    if not users:
        return
    trainer = cli.trainer
    device = trainer.strategy.root_device.type
    # no CPU flash-attn: only kernels injected into the model's flash backends (tests' stand-ins) run off CUDA
    injected = any(isinstance(b, attention.FlashBackend) and b.injected
                   for m in cli.model.model.modules() for b in vars(m).values())
    if device != "cuda" and not injected:
        name, what = next(iter(users.items()))
        raise ValueError(f"{name} runs {what}, which needs CUDA, but the trainer runs on {device!r} "
                         f"(trainer.accelerator={trainer.accelerator.__class__.__name__}); use a GPU, or "
                         f"attn_backend in ['dense', 'sdpa', 'eager', 'flex'] / attn_implementation in "
                         f"['sdpa', 'eager'] on CPU")
    precision = str(trainer.precision)
    fsdp_dtype = cli.model.hparams.fsdp_param_dtype if isinstance(trainer.strategy, ModelParallelStrategy) else None
    if precision in HALF_PRECISIONS or fsdp_dtype in ("bfloat16", "float16"):
        return
    modules = dict(cli.model.model.named_modules())
    fp32 = [n for n in users if any(p.dtype not in attention.FLASH_DTYPES for p in modules[n].parameters())]
    if fp32:
        raise ValueError(f"{fp32[0]} runs {users[fp32[0]]}, which takes fp16/bf16 only, but its weights are fp32 "
                         f"under trainer.precision={precision!r}"
                         f"{'' if fsdp_dtype is None else f' and model.fsdp_param_dtype={fsdp_dtype!r}'}: set "
                         f"trainer.precision in {list(HALF_PRECISIONS)}, or under FSDP2 model.fsdp_param_dtype in "
                         f"['bfloat16', 'float16'] (trainer/ddp.yaml and trainer/fsdp2_h100.yaml do)")


def main(args: list[str] | None = None) -> CasaCLI:
    """Parse the config, build everything, and fit (no subcommand: fitting is the job)."""
    torch.set_float32_matmul_precision("high")
    try:
        cli = CasaCLI(**CLI_ARGS, save_config_kwargs={"overwrite": True}, args=args, run=False)
        check_attention_precision(cli)
        lock = claim_run_dir(cli)
    except (RunLocked, RunDirUsed) as e:
        if os.environ.get("CASA_TRACEBACK"):
            raise
        print(f"experiments.fit: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # a value the type system could not reject (a missing checkpoint directory, a shard
        # pattern matching nothing, inconsistent sizes): one line naming it, no traceback
        if os.environ.get("CASA_TRACEBACK"):
            raise
        print(f"experiments.fit: config error: {e}\n(set CASA_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    # the checkpoint carries its own config, so evaluate/stream/casa.assistant need only the file
    cli.model.run_config = cli.parser.dump(cli.config, skip_none=False, skip_validation=True)
    _log_grid_hparams(cli)
    from casa.checkpoint import CheckpointError, resolve_resume
    from casa.train.checkpoint_io import CheckpointWriteError, NonFiniteCheckpointError

    run_dir = Path(cli.trainer.default_root_dir)
    try:
        try:
            # "last": the newest intact checkpoint (a warning names a damaged last.ckpt)
            ckpt_path = resolve_resume(cli.config.get("ckpt_path"),
                                       getattr(cli.trainer.checkpoint_callback, "dirpath", None))
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
        except (CheckpointError, CheckpointWriteError, NonFiniteCheckpointError) as e:
            if os.environ.get("CASA_TRACEBACK"):
                raise
            if cli.trainer.is_global_zero:
                _fail(run_dir, str(e), cli.trainer.global_step)
            print(f"experiments.fit: error: {e}\n(set CASA_TRACEBACK=1 for the full traceback)", file=sys.stderr)
            raise SystemExit(1) from None
        except SIGTERMException:  # e.g. its grid died (experiments.tether): stopped at a batch boundary
            print(f"experiments.fit: stopped by SIGTERM at step {cli.trainer.global_step}; its checkpoints are kept "
                  f"(resume with --ckpt_path last)", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        cli.after_fit()
        failure = run_failure(cli.trainer)
        if failure:
            print(f"experiments.fit: failed: {failure} (metrics.json says so; the checkpoints hold the last finite "
                  f"weights)", file=sys.stderr)
            raise SystemExit(1)
    finally:
        if lock is not None:
            lock.release()
    return cli


if __name__ == "__main__":
    main()
