"""`experiments.evaluate`'s per-window-position answer loss (`PositionLoss`) against a hand
computation, and `--step0`'s model against a freshly built one."""

from __future__ import annotations

import math

import torch

from casa.batch import build_batch, collate_packed
from experiments.evaluate import PositionLoss


def test_position_loss_counts_each_target_at_its_window_position():
    """Two samples. Sample a: [t t | img | t t t t] (the image opens a window at text index 2);
    targets predicted from indices 3, 4. Sample b, text only: targets from 1, 2, 3.

        sample a   index 0 1 2 3 4 5      window 0: 0-1, window 1: 2-5
                   pos   0 1 0 1 2 3      targets at pos 1, 2
        sample b   index 0 1 2 3          one window
                   pos   0 1 2 3          targets at pos 1, 2, 3 (3 is dropped: L = 3)
    """
    V = 7
    la = torch.tensor([-100, -100, -100, 4, 5, -100])
    lb = torch.tensor([-100, 1, 2, 3])
    a = build_batch(torch.zeros(6, dtype=torch.long), [0, 6], pixel_values=torch.zeros(4, 1176), image_grid_thw=[[1, 2, 2]],
                    image_text_position=[2], merge=2, labels=la, meta=[{"task": "x"}])
    b = build_batch(torch.zeros(4, dtype=torch.long), [0, 4], pixel_values=torch.zeros(0, 1176), image_grid_thw=[],
                    image_text_position=[], merge=2, labels=lb, meta=[{"task": "y"}])
    batch = collate_packed([a, b])
    logits = torch.randn(10, V, generator=torch.Generator().manual_seed(0))
    pl = PositionLoss(3)
    pl.update(batch, logits)
    out = pl.compute()
    logp = logits.log_softmax(-1)
    nll = lambda i, t: -float(logp[i, t])  # noqa: E731
    assert out["x"]["tokens"] == 2 and out["y"]["tokens"] == 2
    assert out["x"]["ppl_by_position"][0] is None
    assert math.isclose(out["x"]["ppl_by_position"][1], math.exp(nll(3, 4)), rel_tol=1e-5)
    assert math.isclose(out["x"]["ppl_by_position"][2], math.exp(nll(4, 5)), rel_tol=1e-5)
    assert math.isclose(out["y"]["ppl_by_position"][1], math.exp(nll(7, 1)), rel_tol=1e-5)
    assert math.isclose(out["y"]["ppl"], math.exp((nll(7, 1) + nll(8, 2)) / 2), rel_tol=1e-5)
