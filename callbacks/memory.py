"""Memory monitor: peak memory per logging interval and per run, on CUDA and on CPU.

CUDA: peak allocated and reserved bytes (`torch.cuda.max_memory_*`), reset after each
interval. CPU: process RSS and its peak (VmHWM from /proc/self/status), the peak reset
after each interval by writing "5" to /proc/self/clear_refs (Linux >= 4.0) so intervals
are comparable. Under DDP/FSDP each rank measures itself; logged values are the maximum
over ranks, and the end-of-fit table lists every rank.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from casa.memory import peak_rss_bytes, reset_peak_rss, rss_bytes


class MemoryMonitor(L.Callback):
    """Args:
        every_n_steps: logging interval (optimizer steps).
    """

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 1:
            raise ValueError(f"MemoryMonitor.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.run_peak: dict[str, int] = {}
        self.history: list[dict[str, int]] = []
        self._step = 0  # the global step of the last optimizer step seen

    def _measure(self, device: torch.device) -> dict[str, int]:
        if device.type == "cuda":
            m = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                 "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
                 "allocated_bytes": torch.cuda.memory_allocated(device)}
            torch.cuda.reset_peak_memory_stats(device)
        else:
            m = {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes()}
            reset_peak_rss()
        return m

    def run_peak_bytes(self, device: torch.device) -> int:
        """This process's peak over the whole run so far, the current interval included
        (peak allocated bytes on CUDA, peak RSS on CPU): what the ablation grid reports."""
        last = self._measure(device)
        for k, v in last.items():
            self.run_peak[k] = max(self.run_peak.get(k, 0), v)
        return self.run_peak["peak_allocated_bytes" if "peak_allocated_bytes" in last else "peak_rss_bytes"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(pl_module.device)  # start the first interval clean
        self._step = trainer.global_step  # a resumed run starts from its checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # once per optimizer step, after its last micro-batch: an interval holds whole steps
        # (micro-batches of an accumulation window leave global_step as it was)
        if trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        if (trainer.global_step % self.every_n_steps) != 0:
            return
        local = self._measure(pl_module.device)
        for k, v in local.items():
            self.run_peak[k] = max(self.run_peak.get(k, 0), v)
        self.history.append({"step": trainer.global_step, **local})
        # the maximum over ranks is what fits-or-not depends on
        t = torch.tensor([float(v) for v in local.values()], device=pl_module.device)
        t = trainer.strategy.reduce(t, reduce_op="max") if trainer.world_size > 1 else t
        pl_module.log_dict({f"memory/{k}": float(x) for k, x in zip(local, t.tolist())}, rank_zero_only=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        keys = sorted(self.run_peak)
        if not keys:
            return
        local = torch.tensor([float(self.run_peak[k]) for k in keys], device=pl_module.device)
        per_rank = trainer.strategy.all_gather(local) if trainer.world_size > 1 else local[None]
        self._print(keys, per_rank.reshape(-1, len(keys)).tolist())

    @rank_zero_only
    def _print(self, keys: list[str], rows: list[list[float]]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="peak memory over the run (MiB)")
        table.add_column("rank")
        for k in keys:
            table.add_column(k.replace("_bytes", ""), justify="right")
        for r, row in enumerate(rows):
            table.add_row(str(r), *(f"{v / 2 ** 20:,.1f}" for v in row))
        Console().print(table)
