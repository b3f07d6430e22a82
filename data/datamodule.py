"""LightningDataModules: image stream, video stream, and their mixture.

Their constructor signatures are the YAML schema (`data:` in the experiment configs).
Shard arguments accept a directory (its `train-*.tar` / `val-*.tar`), a glob, or brace
notation (`shards/train-{000000..000009}.tar`). Every DataModule exposes `tokenizer`,
`template` and `stop_token_ids` for the LightningModule's generation metrics, and a
`state_dict` with the number of training batches consumed, so a resumed run continues at
the same data position (see `data.dataset`).
"""

from __future__ import annotations

import glob
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from casa.batch import PackedBatch
from data.dataset import SampleProcessor, ShardStream, VideoOptions
from data.templates import ChatTemplate
from data.tokenizer import build_tokenizer, load_tokenizer


def expand_shards(pattern: str, split: str = "train") -> list[str]:
    """A directory, glob or brace pattern -> sorted existing shard paths; clear errors otherwise."""
    if not pattern:
        raise ValueError(f"empty shard pattern for the {split} split")
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, f"{split}-*.tar")
    import braceexpand

    paths: list[str] = []
    for p in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else ([p] if os.path.exists(p) else [])
        if not matches:
            raise FileNotFoundError(f"no shard matches {p!r} (from {split} pattern {pattern!r})")
        paths.extend(matches)
    return paths


def resolve_tokenizer(spec: str):
    """"char" -> the built-in character tokenizer (built once in the temp dir); else a local directory."""
    if spec == "char":
        d = Path(tempfile.gettempdir()) / "casa-char-tokenizer"
        if (d / "tokenizer.json").is_file():
            return load_tokenizer(d)
        return build_tokenizer(d)
    return load_tokenizer(spec)


class _Repeatable(IterableDataset):
    """Iterate a mixture of two streams with a seeded choice per batch (3 image : 1 video)."""

    def __init__(self, a: ShardStream, b: ShardStream, ratio: float, seed: int, skip_batches: int = 0):
        super().__init__()
        self.a, self.b, self.ratio, self.seed, self.skip_batches = a, b, ratio, seed, skip_batches

    def __iter__(self) -> Iterator[PackedBatch]:
        from data.dataset import _slot

        slot, slots, skip = _slot(self.skip_batches)
        rng = random.Random(self.seed * 31 + slot)
        ia, ib = self.a.batches(slot, slots), self.b.batches(slot, slots)
        i = 0
        while True:
            b = next(ia) if rng.random() < self.ratio else next(ib)
            if i >= skip:
                yield b
            i += 1


class ImageDataModule(L.LightningDataModule):
    """Args:
        train: training shards (directory, glob or brace pattern).
        val: validation shards (None: no validation).
        tokenizer: "char" (built-in, offline) or a local tokenizer directory.
        template: chat template, "helium" or "qwen2_5_vl".
        max_text_tokens: text-token cap per packed row (paper: 2048).
        max_image_tokens: image-token cap per packed row (paper: 20480).
        max_pixels: images above are downscaled, aspect ratio kept (paper: 896*896).
        min_pixels: images below are upscaled.
        rows_per_batch: packed rows per training step.
        num_workers: DataLoader workers.
        seed: shuffling seed.
        shuffle_buffer: samples in the shuffle buffer.
        pack_buffer: look-ahead of the packer.
        val_rows_samples: samples per validation row (small rows keep generation batches small).
    """

    def __init__(self, train: str, val: str | None = None, tokenizer: str = "char", template: str = "helium",
                 max_text_tokens: int = 2048, max_image_tokens: int = 20480, max_pixels: int = 896 * 896,
                 min_pixels: int = 56 * 56, rows_per_batch: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 256, pack_buffer: int = 64, val_rows_samples: int = 16):
        super().__init__()
        if rows_per_batch < 1:
            raise ValueError(f"{type(self).__name__}.rows_per_batch={rows_per_batch} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"{type(self).__name__}.num_workers={num_workers} must be >= 0")
        self.train_urls = expand_shards(train, "train")
        self.val_urls = expand_shards(val, "val") if val else []
        self.tokenizer = resolve_tokenizer(tokenizer)
        self.template = ChatTemplate(template, self.tokenizer)
        self.stop_token_ids = self.template.stop_token_ids
        self.max_text_tokens, self.max_image_tokens = max_text_tokens, max_image_tokens
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.rows_per_batch, self.num_workers, self.seed = rows_per_batch, num_workers, seed
        self.shuffle_buffer, self.pack_buffer, self.val_rows_samples = shuffle_buffer, pack_buffer, val_rows_samples
        self._skip_batches = 0
        self.task_groups = self._read_manifest()

    def _read_manifest(self) -> dict[str, str]:
        m = Path(self.train_urls[0]).parent / "manifest.json"
        if m.is_file():
            return dict(json.loads(m.read_text()).get("tasks", {}))
        return {}

    def processor(self) -> SampleProcessor:
        return SampleProcessor(self.template, self.max_pixels, self.min_pixels)

    def _packer(self, eval_rows: bool = False) -> dict[str, Any]:
        return dict(max_text_tokens=self.max_text_tokens, max_image_tokens=self.max_image_tokens,
                    buffer_size=1 if eval_rows else self.pack_buffer,
                    max_samples_per_row=self.val_rows_samples if eval_rows else None)

    def train_stream(self, skip_batches: int = 0) -> ShardStream:
        return ShardStream(self.train_urls, self.processor(), self._packer(), self.rows_per_batch, shuffle=True,
                           repeat=True, seed=self.seed, shuffle_buffer=self.shuffle_buffer, skip_batches=skip_batches)

    def val_stream(self) -> ShardStream:
        return ShardStream(self.val_urls, self.processor(), self._packer(eval_rows=True), 1, shuffle=False,
                           repeat=False, seed=self.seed)

    def _loader(self, ds: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False,
                          collate_fn=None, prefetch_factor=2 if workers else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream(self._skip_batches), self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        return self._loader(self.val_stream(), min(self.num_workers, len(self.val_urls)))

    def transfer_batch_to_device(self, batch: PackedBatch, device, dataloader_idx: int) -> PackedBatch:
        return batch.to(device)

    # ------------------------------------------------------------------ resume
    def _consumed(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return self._skip_batches
        # batches the fit loop has taken from the train loader (processed, incl. the current one)
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self._consumed(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"resuming with data seed {self.seed} but the checkpoint used {state['seed']}")
        self._skip_batches = int(state.get("batches_consumed", 0))


class VideoDataModule(ImageDataModule):
    """Args (in addition to ImageDataModule's):
        fps: frame sampling rate (paper: 2).
        min_duration: clips shorter than this get `min_frames` uniform frames (paper: 10 s, 20 frames).
        min_frames: see min_duration.
        max_duration: only the first seconds of a video are used (paper: 180).
        frame_max_pixels: frame pixel cap (paper: 448*448).
    """

    def __init__(self, train: str, val: str | None = None, tokenizer: str = "char", template: str = "helium",
                 max_text_tokens: int = 2048, max_image_tokens: int = 20480, max_pixels: int = 896 * 896,
                 min_pixels: int = 56 * 56, rows_per_batch: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 256, pack_buffer: int = 64, val_rows_samples: int = 16, fps: float = 2.0,
                 min_duration: float = 10.0, min_frames: int = 20, max_duration: float = 180.0,
                 frame_max_pixels: int = 448 * 448):
        super().__init__(train, val, tokenizer, template, max_text_tokens, max_image_tokens, max_pixels, min_pixels,
                         rows_per_batch, num_workers, seed, shuffle_buffer, pack_buffer, val_rows_samples)
        if fps <= 0:
            raise ValueError(f"VideoDataModule.fps={fps} must be > 0")
        self.video = VideoOptions(fps, min_duration, min_frames, max_duration, frame_max_pixels)

    def processor(self) -> SampleProcessor:
        return SampleProcessor(self.template, self.max_pixels, self.min_pixels, self.video)


class MixtureDataModule(L.LightningDataModule):
    """Image and video streams interleaved per batch, `ratio` of them image (paper: 3:1 -> 0.75).

    Validation concatenates both validation streams (one loader each)."""

    def __init__(self, image: ImageDataModule, video: VideoDataModule, ratio: float = 0.75, seed: int = 0):
        super().__init__()
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"MixtureDataModule.ratio={ratio} must be strictly between 0 and 1")
        self.image, self.video, self.ratio, self.seed = image, video, ratio, seed
        self.tokenizer, self.template, self.stop_token_ids = image.tokenizer, image.template, image.stop_token_ids
        self.task_groups = {**image.task_groups, **video.task_groups}
        self._skip_batches = 0

    def train_dataloader(self) -> DataLoader:
        ds = _Repeatable(self.image.train_stream(), self.video.train_stream(), self.ratio, self.seed, self._skip_batches)
        return DataLoader(ds, batch_size=None, num_workers=self.image.num_workers,
                          prefetch_factor=2 if self.image.num_workers else None)

    def val_dataloader(self):
        return [dl for dl in (self.image.val_dataloader(), self.video.val_dataloader()) if not isinstance(dl, list)]

    def transfer_batch_to_device(self, batch: PackedBatch, device, dataloader_idx: int) -> PackedBatch:
        return batch.to(device)

    def state_dict(self) -> dict[str, Any]:
        consumed = self._skip_batches if self.trainer is None else int(
            self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        return {"batches_consumed": consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skip_batches = int(state.get("batches_consumed", 0))
