"""Stop a run after a number of optimizer steps without touching `trainer.max_steps`.

`max_steps` also sets the learning-rate schedule (warmup, constant, decay to the end), so
cutting a run short by lowering it changes every step's learning rate. This callback ends
the run as a preemption would, with the schedule intact: resuming with `--ckpt_path last`
then continues exactly where it stopped (the resume test uses it to interrupt a run).
"""

from __future__ import annotations

import lightning as L


class StopAfterSteps(L.Callback):
    """Stop training once `trainer.global_step` reaches `steps` (checkpoints written by
    `ModelCheckpoint` at that step are kept; the run is not marked finished)."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"StopAfterSteps.steps={steps} must be >= 1")
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True
