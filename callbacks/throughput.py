"""Throughput: samples, text tokens, image tokens and FLOPs per second, and MFU.

Lightning's own `ThroughputMonitor` (rank 0, windowed over the last `window_size`
micro-batches, logged when an optimizer step closes on a logging step) gives, under the
`train/` prefix:

    device/samples_per_sec, device/items_per_sec (text tokens), device/flops_per_sec,
    device/mfu (on GPUs whose peak Lightning knows), and with several ranks their global
    samples_per_sec, items_per_sec, flops_per_sec (rank 0's rate times the world size).

The FLOPs are `casa.flops.training_flops` of each packed batch (forward + backward, the
model's own dimensions and the batch's layout), handed to Lightning as the module's
`flops_per_batch`. Image tokens, which Lightning has no notion of, are added over the same
window: `device/image_tokens_per_sec` (rank 0's), and with several ranks
`image_tokens_per_sec`, the image tokens of *all* ranks over the window divided by its
duration. That one is a real sum (one all-reduce per logging step) rather than Lightning's
rank-0-times-world-size, because packed batches hold very different numbers of images on
different ranks.
"""

from __future__ import annotations

from collections import deque

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from casa.batch import PackedBatch
from casa.flops import training_flops


def _samples(batch: PackedBatch) -> int:
    return batch.num_samples


def _text_tokens(batch: PackedBatch) -> int:
    return batch.num_text_tokens


class TokenThroughput(ThroughputMonitor):
    """Args:
        window_size: micro-batches averaged over (Lightning's window).
    """

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=_samples, length_fn=_text_tokens, window_size=window_size)
        self.window_size = window_size
        # this rank's image tokens seen after each micro-batch of the window, kept on the device
        # (a 0-d tensor each) so that counting costs no host sync between logging steps
        self._image_totals: deque[torch.Tensor] = deque(maxlen=window_size)
        self._image_window: tuple[float, float] | None = None  # (rank 0's, all ranks') tokens over the window

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._image_totals.clear()
        super().on_train_start(trainer, pl_module)  # rank 0 only

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: PackedBatch,
                           *args) -> None:
        # every rank counts and, on the steps Lightning logs, joins the sum; rank 0 then logs
        n = batch.window_cu_seqlens_image[-1].to(torch.int64)  # 0-d, on the batch's device: no host sync
        self._image_totals.append(n if not self._image_totals else self._image_totals[-1] + n)
        self._image_window = None
        full = len(self._image_totals) == self.window_size
        if full and not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs:
            local = self._image_totals[-1] - self._image_totals[0]  # the window's image tokens, Lightning's span
            total = trainer.strategy.reduce(local.clone(), reduce_op="sum")
            self._image_window = (float(local), float(total))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)  # rank 0 only

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, iter_num: int) -> None:
        if hasattr(pl_module, "flops_per_batch"):
            # Lightning reads `pl_module.flops_per_batch` for the batch it is measuring. Training
            # batches get their forward + backward count; validation (a loss forward plus greedy
            # generation, which the count does not model) reports no FLOPs rather than wrong ones.
            training = trainer.state.stage == RunningStage.TRAINING and hasattr(pl_module, "model")
            if training and trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()  # as Lightning does next: the layout's host reads add no stall
            pl_module.flops_per_batch = training_flops(pl_module.model, batch) if training else None
        super()._update(trainer, pl_module, batch, iter_num)

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        super()._compute(trainer, iter_num)
        if trainer.state.stage != RunningStage.TRAINING or self._image_window is None:
            return
        times = self._throughputs[RunningStage.TRAINING]._time  # the window Lightning's rates use
        elapsed = times[-1] - times[0]
        local, total = self._image_window
        sep = self._throughputs[RunningStage.TRAINING].separator
        metrics = {f"train{sep}device{sep}image_tokens_per_sec": local / elapsed}
        if trainer.world_size > 1:
            metrics[f"train{sep}image_tokens_per_sec"] = total / elapsed
        trainer._logger_connector.log_metrics(metrics, step=iter_num)
