"""Shared builders for tests that train: tiny synthetic shards, datamodule and module."""

from __future__ import annotations

from pathlib import Path

from casa.fusion import CASA
from casa.tiny import tiny_model
from casa.train.module import CasaModule
from data.datamodule import VideoDataModule
from data.synth import ensure_synth

TASKS = ["color", "shape", "count", "video_direction", "live_caption"]


def tiny_synth(root: Path, train: int = 64, val: int = 16, test: int = 16) -> Path:
    return ensure_synth(root / "synth", seed=0, train=train, val=val, test=test, tasks=TASKS, progress=False)


def tiny_datamodule(root: Path, **kw) -> VideoDataModule:
    d = tiny_synth(root)
    args = dict(train=str(d), val=str(d), max_text_tokens=256, max_image_tokens=256, max_pixels=56 * 56,
                frame_max_pixels=56 * 56, val_rows_samples=8)
    args.update(kw)
    return VideoDataModule(**args)


def tiny_module(fusion=None, **kw) -> CasaModule:
    model = tiny_model(fusion if fusion is not None else CASA("plus"), hidden_size=32, num_layers=2)
    args = dict(warmup_steps=1, val_max_new_tokens=4, val_max_samples=8)
    args.update(kw)
    return CasaModule(model, **args)


def fit_demo_tiny(root: Path, synth: Path, logger: str = "false") -> Path:
    """`experiments.fit` on the demo + tiny configs for 2 steps, no validation -> last.ckpt
    (a checkpoint callback only; `logger`: the --trainer.logger value, JSON)."""
    import json
    import sys

    from experiments.fit import main

    configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    only_ckpt = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
    argv = sys.argv
    sys.argv = ["experiments.fit"]  # LightningCLI(args=...) must not see pytest's argv
    try:
        main(["--config", str(configs / "demo.yaml"), "--config", str(configs.parents[1] / "tests" / "configs" / "tiny.yaml"),
              "--run_dir", str(root / "run"), "--trainer.max_steps", "2", "--synth", "null",
              "--data.init_args.train", str(synth), "--data.init_args.val", str(synth), "--model.val_generate", "false",
              "--trainer.limit_val_batches", "0", "--trainer.logger", logger, "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.callbacks", json.dumps(only_ckpt)])
    finally:
        sys.argv = argv
    return root / "run" / "checkpoints" / "last.ckpt"
