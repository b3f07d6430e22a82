"""Optimiser and schedule of the paper: Adam with two learning rates, warmup-constant-decay.

New parameters (projector, fusion layers, gates, Q-Former) train at `lr_new` (1e-4),
pretrained parameters left trainable (backbone, last vision blocks) at `lr_pretrained`
(1e-5); frozen parameters are not given to the optimiser at all.

    lr(step)/lr  1 |      ______________
                   |     /              \\
                   |    /                \\
                 0 +---+----------------+----+--> step
                   0  warmup      total-decay total
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_constant_decay(step: int, warmup_steps: int, decay_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at `step` (pure; tested on its own)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


def random_init_in_pretrained(groups: dict[str, list], random_prefixes: tuple[str, ...]) -> list[str]:
    """Names in the "pretrained" group that start with one of `random_prefixes` (the
    components built from random weights, e.g. ("backbone.",) for `Backbone(config=...)`).

    The paper's rule (App. B, Table 10) gives the low rate to weights that *were* pretrained;
    a random-initialised LM or tower in that group learns 10x slower than the new layers, so
    a comparison between strategies that read images through new layers (CA, CASA⊕) and
    ones that read them through existing weights (insertion, CASA∨) is confounded (issue 16)."""
    return [n for n, _ in groups.get("pretrained", []) if n.startswith(random_prefixes)] if random_prefixes else []


def build_optimizer(groups: dict[str, list], lr_new: float, lr_pretrained: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """groups: {"new": [(name, param)], "pretrained": [...]} (`VisionLanguageModel.parameter_groups`)."""
    param_groups = []
    for name, lr in (("new", lr_new), ("pretrained", lr_pretrained)):
        params = [p for _, p in groups.get(name, [])]
        if params:
            param_groups.append({"params": params, "lr": lr, "name": name, "weight_decay": weight_decay})
    if not param_groups:
        raise ValueError("no trainable parameters: every parameter is frozen")
    return torch.optim.Adam(param_groups, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int, total_steps: int) -> LambdaLR:
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0 (set trainer.max_steps)")
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) + decay_steps ({decay_steps}) exceed total_steps ({total_steps})")
    return LambdaLR(optimizer, lambda s: warmup_constant_decay(s, warmup_steps, decay_steps, total_steps))
