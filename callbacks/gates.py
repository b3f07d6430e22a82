"""Gate monitor for gated cross-attention: tanh(gate) per fused layer over training.

Logged as `gates/layer_XX` every `every_n_steps` steps (curves in TensorBoard/CSV), and
drawn at the end of fit as `<run_dir>/gates.png`. For other strategies it does nothing.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def gate_values(model: torch.nn.Module) -> dict[int, float]:
    """tanh(gate) of every gated fusion layer, by block index."""
    out = {}
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return out
    for i, block in enumerate(backbone.layers):
        layer = getattr(block, "fusion_attn", None)
        gate = getattr(layer, "gate", None) if layer is not None else None
        if gate is not None:
            g = gate.detach()
            g = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2 DTensor
            out[i] = float(torch.tanh(g).reshape(-1)[0])
    return out


class GateMonitor(L.Callback):
    """Args:
        every_n_steps: logging interval.
    """

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 1:
            raise ValueError(f"GateMonitor.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.history: list[tuple[int, dict[int, float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        values = gate_values(getattr(pl_module, "model", pl_module))
        if not values:
            return
        self.history.append((trainer.global_step, values))
        pl_module.log_dict({f"gates/layer_{i:02d}": v for i, v in values.items()}, rank_zero_only=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.history or not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        steps = [s for s, _ in self.history]
        for layer in sorted(self.history[0][1]):
            ax.plot(steps, [v[layer] for _, v in self.history], label=f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("tanh(gate)")
        ax.legend(fontsize=7)
        ax.set_title("gated cross-attention gates")
        fig.tight_layout()
        path = Path(trainer.default_root_dir) / "gates.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
