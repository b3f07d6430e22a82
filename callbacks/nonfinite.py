"""A diverged run stops as a failure instead of training on NaN and reporting success.

Every optimizer step, before the weights change, one fused check: the finiteness of each
micro-batch's loss (flags kept on the device, `on_before_backward`) and of the gradients'
norms (`torch._foreach_norm`: one fused kernel per dtype, NaN/inf propagate into a norm),
reduced over ranks in one collective so every rank takes the same decision, then read back
once: one host sync per step, whatever the number of layers.

On a non-finite step the gradients are dropped (`zero_grad(set_to_none=True)`: the optimizer
then updates nothing), so the weights stay those of the last good step. Up to `max_skips`
such steps are skipped over the run; the next one stops the run: `failure` says
"non-finite loss at step k" (or "gradient"), `experiments.fit` writes it into metrics.json
and exits non-zero, and `experiments.grid` records the run as failed with that reason. The
checkpoint writer (`casa.train.checkpoint_io.AtomicCheckpointIO`) refuses non-finite weights
on its own as well.

Under a fp16 GradScaler (`precision: 16-mixed`) inf gradients are how the scaler finds its
scale (it skips those steps itself), so only the loss is checked there.

`experiments.fit` always has one (`experiments.fit.add_safety_defaults`); to skip up to N
steps, list it in `trainer.callbacks` with `init_args: {max_skips: N}` (its constructor is its
config).
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteGuard(L.Callback):
    """Args:
        max_skips: non-finite steps skipped over the whole run (resumes included) before the
            run stops as failed; 0 stops at the first (its update is skipped too, so the last
            checkpoint holds the last good weights).
        check_gradients: also check the gradients (the loss alone misses a NaN that appears in
            the backward pass only).
    """

    def __init__(self, max_skips: int = 0, check_gradients: bool = True):
        if not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"NonFiniteGuard.max_skips={max_skips!r} must be an integer >= 0")
        self.max_skips = max_skips
        self.check_gradients = check_gradients
        self.skipped = 0
        self.failure: str | None = None
        self._loss_bad: torch.Tensor | None = None  # device flag over this step's micro-batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.failure = None  # a resumed run starts clean; `skipped` comes from the checkpoint
        self._loss_bad = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool,
                                                                                device=pl_module.device)
        self._loss_bad = None
        grad_bad = torch.zeros_like(loss_bad)
        if self.check_gradients and getattr(trainer.precision_plugin, "scaler", None) is None:
            grad_bad = ~grads_finite(optimizer).to(loss_bad.device)
        flags = torch.stack([loss_bad, grad_bad]).float()  # [2]
        flags = trainer.strategy.reduce(flags, reduce_op="sum")  # one collective: every rank decides alike
        loss_bad_any, grad_bad_any = (flags > 0).tolist()  # the step's one host sync
        if not (loss_bad_any or grad_bad_any):
            return
        step = trainer.global_step + 1
        what = "loss" if loss_bad_any else "gradient"
        optimizer.zero_grad(set_to_none=True)  # no update: the weights stay the last good step's
        self.skipped += 1
        if self.skipped > self.max_skips:
            self.failure = f"non-finite {what} at step {step}"
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"NonFiniteGuard: {self.failure}: stopping (skipped {self.skipped - 1} of max_skips="
                      f"{self.max_skips} before; the weights are those of the last finite step)",
                      file=sys.stderr, flush=True)
        else:
            rank_zero_warn(f"NonFiniteGuard: non-finite {what} at step {step}: update skipped "
                           f"({self.skipped} of max_skips={self.max_skips})")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Whether every gradient the optimizer would apply is finite -> a 0-d bool tensor on the
    gradients' device (no host sync). Sharded (DTensor) gradients are checked on this rank's
    shard; the caller reduces over ranks."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(grads)  # one fused kernel per (device, dtype) group
    return torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all()
