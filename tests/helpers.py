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
