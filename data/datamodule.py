"""LightningDataModules: image stream, video stream, and their mixture.

Their constructor signatures are the YAML schema (`data:` in the experiment configs).
Shard arguments accept a directory (its `train-*.tar` / `val-*.tar`), a glob, or brace
notation (`shards/train-{000000..000009}.tar`). Every DataModule exposes `tokenizer`,
`template` and `stop_token_ids` for the LightningModule's generation metrics.

Resume: the training stream is a pure function of (seed, reader slot), so the data
position is just the number of batches the trainer has consumed. `state_dict()` stores
it, `load_state_dict()` makes the next train loader fast-forward to it (see
`data.dataset`). `StreamLoader` also keeps its iterator alive across Lightning epochs
(with `limit_train_batches`), replaying the few batches Lightning prefetched but did not
use, so an epoch boundary neither restarts nor skips data.

Validation gives every rank the same number of batches (FSDP2 forwards are collectives):
the ranks split the batches of one deterministic pass, and a rank left one short ends with
a padding batch whose samples carry meta "padding" (see `data.dataset`).
"""

from __future__ import annotations

import json
import random
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import lightning as L
import torch
from torch.utils.data import ChainDataset, DataLoader, IterableDataset

from casa.batch import PackedBatch
from casa.processing.image import MIN_PIXELS
from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import CHAR_TOKENIZER, resolve_tokenizer
from data.dataset import SampleProcessor, ShardStream, VideoOptions, reader_slot
from data.format import expand_shards  # noqa: F401  (its home; imported from here by older callers)


def _val_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """At most one worker: every validation reader processes the whole pass (see
    `ShardStream.equal_batches`), so more workers would repeat the work, not share it."""
    workers = min(num_workers, 1)
    return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)


class StreamLoader(DataLoader):
    """A DataLoader (batch_size=None) over an endless stream that starts at `position()`.

    Args:
        dataset: a stream with a `skip_batches` attribute (ShardStream, MixtureStream).
        num_workers: DataLoader workers.
        position: -> absolute index of the next batch to deliver (batches consumed so far);
            None: continue after the last batch this loader delivered.
    """

    def __init__(self, dataset: IterableDataset, num_workers: int = 0, position: Callable[[], int] | None = None):
        # pinned batches (`PackedBatch.pin_memory`, in the loader's pinning thread) let
        # `transfer_batch_to_device` copy to the GPU without blocking the host
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         prefetch_factor=2 if num_workers else None, pin_memory=torch.cuda.is_available())
        self.position = position
        self.next_index = int(getattr(dataset, "skip_batches", 0))
        self._live: Iterator | None = None
        self._pulled = 0  # absolute index of the next batch the live iterator yields
        self._recent: deque = deque(maxlen=4)  # covers Lightning's one-batch prefetch

    def __iter__(self) -> Iterator[PackedBatch]:
        pos = self.position() if self.position is not None else self.next_index
        behind = self._pulled - pos
        if self._live is None or not 0 <= behind <= len(self._recent):
            self.dataset.skip_batches = pos  # workers receive the dataset (with it) when the iterator starts
            self._live, self._pulled, behind = super().__iter__(), pos, 0
            self._recent.clear()
        replay = list(self._recent)[len(self._recent) - behind:] if behind else []
        return self._deliver(replay, pos)

    def close(self) -> None:
        """Stop the live iterator's worker processes (an endless stream never ends by itself)."""
        live, self._live = self._live, None
        self._recent.clear()
        shutdown = getattr(live, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _deliver(self, replay: list[PackedBatch], start: int) -> Iterator[PackedBatch]:
        for i, b in enumerate(replay):
            self.next_index = start + i + 1
            yield b
        for b in self._live:
            self._pulled += 1
            self._recent.append(b)
            self.next_index = self._pulled
            yield b


class _ResumableData(L.LightningDataModule):
    """Counts the training batches consumed; state_dict / load_state_dict carry the count."""

    def _init_resume(self, seed: int) -> None:
        self.seed = seed
        self._resume_from = 0
        self._anchor: int | None = None  # the trainer's batch counter when this run's stream started
        self._train_loader: StreamLoader | None = None

    def _trainer_batches(self) -> int | None:
        trainer = self.trainer
        if trainer is None:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def batches_consumed(self) -> int:
        """Training batches consumed since the start of training (across resumes)."""
        p = self._trainer_batches()
        if p is None:  # driven by hand: the loader knows what it delivered
            return self._train_loader.next_index if self._train_loader is not None else self._resume_from
        if self._anchor is None:
            self._anchor = p
        return self._resume_from + p - self._anchor

    def _rank(self) -> tuple[int | None, int | None]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (None, None)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"{type(self).__name__}.seed={self.seed} but the checkpoint's data used seed "
                             f"{state['seed']}: the stream would not continue where it stopped")
        self._resume_from = int(state.get("batches_consumed", 0))
        self._anchor = None
        self._train_loader = None

    def transfer_batch_to_device(self, batch: PackedBatch, device, dataloader_idx: int) -> PackedBatch:
        return batch.to(device, non_blocking=True)  # the loader pins batches when CUDA is there

    def teardown(self, stage: str) -> None:
        if self._train_loader is not None:
            self._train_loader.close()


class ImageDataModule(_ResumableData):
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
        num_workers: DataLoader workers (validation uses at most one, see `_val_loader`).
        seed: shuffling seed (shards and samples, per epoch).
        shuffle_buffer: samples in the shuffle buffer.
        pack_buffer: look-ahead of the packer.
        val_rows_samples: samples per validation row (small rows keep generation batches small).
        train_samples_per_row: samples per training row (None: as many as the caps take;
            1: no packing, the paper's video training, §4.1).
    """

    def __init__(self, train: str, val: str | None = None, tokenizer: str = CHAR_TOKENIZER, template: Literal["helium", "qwen2_5_vl"] = "helium",
                 max_text_tokens: int = 2048, max_image_tokens: int = 20480, max_pixels: int = 896 * 896,
                 min_pixels: int = MIN_PIXELS, rows_per_batch: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 256, pack_buffer: int = 64, val_rows_samples: int = 16,
                 train_samples_per_row: int | None = None):
        super().__init__()
        name = type(self).__name__
        for field, value, lo in (("max_text_tokens", max_text_tokens, 1), ("max_image_tokens", max_image_tokens, 0),
                                 ("rows_per_batch", rows_per_batch, 1), ("num_workers", num_workers, 0),
                                 ("pack_buffer", pack_buffer, 1), ("val_rows_samples", val_rows_samples, 1),
                                 ("min_pixels", min_pixels, 1), ("shuffle_buffer", shuffle_buffer, 0),
                                 ("train_samples_per_row", 1 if train_samples_per_row is None else train_samples_per_row, 1)):
            if value < lo:
                raise ValueError(f"{name}.{field}={value} must be >= {lo}")
        if max_pixels < min_pixels:
            raise ValueError(f"{name}.max_pixels={max_pixels} must be >= min_pixels={min_pixels}")
        self.train_urls = expand_shards(train, "train")
        self.val_urls = expand_shards(val, "val") if val else []
        self.tokenizer = resolve_tokenizer(tokenizer)
        self.template = ChatTemplate(template, self.tokenizer)
        self.stop_token_ids = self.template.stop_token_ids
        self.max_text_tokens, self.max_image_tokens = max_text_tokens, max_image_tokens
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.rows_per_batch, self.num_workers = rows_per_batch, num_workers
        self.shuffle_buffer, self.pack_buffer, self.val_rows_samples = shuffle_buffer, pack_buffer, val_rows_samples
        self.train_samples_per_row = train_samples_per_row
        self._init_resume(seed)
        self.task_groups = self._read_manifest()

    def _read_manifest(self) -> dict[str, str]:
        """task -> group from a `manifest.json` next to the shards (written by data.synth), if any."""
        m = Path(self.train_urls[0]).parent / "manifest.json"
        if m.is_file():
            try:
                return dict(json.loads(m.read_text()).get("tasks", {}))
            except (ValueError, AttributeError, TypeError):
                return {}
        return {}

    def processor(self) -> SampleProcessor:
        return SampleProcessor(self.template, self.max_pixels, self.min_pixels)

    def _packer(self, eval_rows: bool = False) -> dict[str, Any]:
        return dict(max_text_tokens=self.max_text_tokens, max_image_tokens=self.max_image_tokens,
                    buffer_size=1 if eval_rows else self.pack_buffer,
                    max_samples_per_row=self.val_rows_samples if eval_rows else self.train_samples_per_row)

    def train_stream(self, skip_batches: int = 0) -> ShardStream:
        rank, world = self._rank()
        return ShardStream(self.train_urls, self.processor(), self._packer(), self.rows_per_batch, shuffle=True,
                           repeat=True, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                           skip_batches=skip_batches, rank=rank, world_size=world)

    def val_stream(self) -> ShardStream:
        """One deterministic pass (no shuffle), rows of at most `val_rows_samples` samples,
        the same number of batches on every rank (`ShardStream(equal_batches=True)`: the
        short ranks end with a padding batch, meta "padding")."""
        rank, world = self._rank()
        return ShardStream(self.val_urls, self.processor(), self._packer(eval_rows=True), 1, shuffle=False,
                           repeat=False, seed=self.seed, rank=rank, world_size=world, equal_batches=True)

    def train_dataloader(self) -> StreamLoader:
        self._anchor = None
        loader = StreamLoader(self.train_stream(self._resume_from), self.num_workers,
                              position=self.batches_consumed if self._trainer_batches() is not None else None)
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        return _val_loader(self.val_stream(), self.num_workers)


class VideoDataModule(ImageDataModule):
    """Args (in addition to ImageDataModule's):
        fps: frame sampling rate (paper: 2).
        min_duration: clips shorter than this get `min_frames` uniform frames (paper: 10 s, 20 frames).
        min_frames: see min_duration.
        max_duration: only the first seconds of a video are used (paper: 180).
        frame_max_pixels: frame pixel cap (paper: 448*448, 256 tokens per frame).
        layout: layout of video samples whose JSON does not name one ("qa" or "caption"; the
            sample's own `video.layout` wins, since a transcript cannot become a QA and back).

    A 3-minute video at 2 fps is 360 frames = 92,160 image tokens at 448^2: raise
    `max_image_tokens` for long videos (the paper trains one video per step, no packing),
    or such samples are skipped as `oversize`.
    """

    def __init__(self, train: str, val: str | None = None, tokenizer: str = CHAR_TOKENIZER, template: Literal["helium", "qwen2_5_vl"] = "helium",
                 max_text_tokens: int = 2048, max_image_tokens: int = 20480, max_pixels: int = 896 * 896,
                 min_pixels: int = MIN_PIXELS, rows_per_batch: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 256, pack_buffer: int = 64, val_rows_samples: int = 16, fps: float = 2.0,
                 min_duration: float = 10.0, min_frames: int = 20, max_duration: float = 180.0,
                 frame_max_pixels: int = 448 * 448, layout: Literal["qa", "caption"] = "qa",
                 train_samples_per_row: int | None = None):
        super().__init__(train, val, tokenizer, template, max_text_tokens, max_image_tokens, max_pixels, min_pixels,
                         rows_per_batch, num_workers, seed, shuffle_buffer, pack_buffer, val_rows_samples,
                         train_samples_per_row)
        if fps <= 0 or max_duration <= 0 or min_frames < 1 or frame_max_pixels < min_pixels:
            raise ValueError(f"VideoDataModule: fps={fps}, max_duration={max_duration} must be > 0, min_frames="
                             f"{min_frames} >= 1 and frame_max_pixels={frame_max_pixels} >= min_pixels={min_pixels}")
        if layout not in ("qa", "caption"):
            raise ValueError(f"VideoDataModule.layout={layout!r} is not one of ['qa', 'caption']")
        self.layout = layout
        self.video = VideoOptions(fps, min_duration, min_frames, max_duration, frame_max_pixels, layout=layout)

    def processor(self) -> SampleProcessor:
        return SampleProcessor(self.template, self.max_pixels, self.min_pixels, self.video)


class MixtureStream(IterableDataset):
    """Per batch, a seeded choice between two streams: `ratio` of them from `a` (paper: 3 image : 1 video)."""

    def __init__(self, a: ShardStream, b: ShardStream, ratio: float, seed: int, skip_batches: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.a, self.b, self.ratio, self.seed, self.skip_batches = a, b, ratio, seed, skip_batches
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[PackedBatch]:
        slot, slots, skip = reader_slot(self.skip_batches, self.rank, self.world_size)
        rng = random.Random(self.seed * 31 + slot)
        ia, ib = self.a.batches(slot, slots), self.b.batches(slot, slots)
        i = 0
        while True:
            b = next(ia) if rng.random() < self.ratio else next(ib)
            if i >= skip:
                yield b
            i += 1


class MixtureDataModule(_ResumableData):
    """Image and video streams interleaved per batch, `ratio` of them image (paper: 3:1 -> 0.75).

    Args:
        image: the image DataModule (its tokenizer and template are used for both).
        video: the video DataModule.
        ratio: fraction of training batches drawn from the image stream.
        seed: seed of the per-batch choice.

    Validation is ONE loader over the image then the video validation stream (the
    LightningModule's validation_step takes no dataloader_idx); `meta.task` tells them apart."""

    def __init__(self, image: ImageDataModule, video: VideoDataModule, ratio: float = 0.75, seed: int = 0):
        super().__init__()
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"MixtureDataModule.ratio={ratio} must be strictly between 0 and 1")
        self.image, self.video, self.ratio = image, video, ratio
        self.tokenizer, self.template, self.stop_token_ids = image.tokenizer, image.template, image.stop_token_ids
        self.task_groups = {**image.task_groups, **video.task_groups}
        self._init_resume(seed)

    def train_dataloader(self) -> StreamLoader:
        rank, world = self._rank()
        self.image.trainer = self.video.trainer = self.trainer  # their streams split by the same ranks
        ds = MixtureStream(self.image.train_stream(), self.video.train_stream(), self.ratio, self.seed,
                           self._resume_from, rank, world)
        self._anchor = None
        loader = StreamLoader(ds, self.image.num_workers,
                              position=self.batches_consumed if self._trainer_batches() is not None else None)
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        self.image.trainer = self.video.trainer = self.trainer
        streams = [dm.val_stream() for dm in (self.image, self.video) if dm.val_urls]
        if not streams:
            return []
        return _val_loader(ChainDataset(streams), self.image.num_workers)
