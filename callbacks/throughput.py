"""Throughput: samples, text tokens and image tokens per second.

Samples/s and text tokens/s come from Lightning's own `ThroughputMonitor` (windowed,
synchronised across ranks, FLOP-aware when the model reports FLOPs); image tokens/s,
which Lightning has no notion of, are added alongside over the same window.
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor

from casa.batch import PackedBatch


def _samples(batch: PackedBatch) -> int:
    return batch.num_samples


def _text_tokens(batch: PackedBatch) -> int:
    return batch.num_text_tokens


class TokenThroughput(ThroughputMonitor):
    """Args:
        window_size: batches averaged over.
    """

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=_samples, length_fn=_text_tokens, window_size=window_size)
        self.window_size = window_size
        self._image_tokens: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        self._image_tokens.append((time.perf_counter(), batch.num_image_tokens))
        self._image_tokens = self._image_tokens[-(self.window_size + 1):]
        if len(self._image_tokens) > 1 and trainer.global_step % trainer.log_every_n_steps == 0:
            (t0, _), (t1, _) = self._image_tokens[0], self._image_tokens[-1]
            n = sum(x for _, x in self._image_tokens[1:])
            pl_module.log("train_throughput/image_tokens_per_sec", n / max(t1 - t0, 1e-9))
