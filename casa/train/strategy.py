"""FSDP2's checkpoint directories, written atomically.

Lightning's `ModelParallelStrategy(save_distributed_checkpoint=True)` writes `last.ckpt/` in
place: every rank its DCP shards, then `.metadata`, then rank 0 `meta.pt`, into the directory
the previous checkpoint is in. A kill (or a full disk) part-way leaves a directory mixing the
old step's files with the new step's: neither checkpoint survives. It does not go through a
CheckpointIO plugin, so `casa.train.checkpoint_io.AtomicCheckpointIO` cannot cover it.

`AtomicModelParallelStrategy` writes the directory under a hidden sibling name
(`.NAME.partial`, the same on every rank), waits for every rank, then rank 0 swaps it in
(`casa.atomic.swap_in_directory`: the old directory renamed aside, the new one renamed to NAME,
the old one removed) and every rank waits again: a reader sees the old checkpoint or the new
one, whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from casa.atomic import swap_in_directory


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy (same arguments) whose distributed checkpoints appear whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # an earlier attempt's, killed
        self.barrier("AtomicModelParallelStrategy.save_checkpoint:start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("AtomicModelParallelStrategy.save_checkpoint:written")
        if self.global_rank == 0:
            swap_in_directory(partial, path)
        self.barrier("AtomicModelParallelStrategy.save_checkpoint:swapped")
