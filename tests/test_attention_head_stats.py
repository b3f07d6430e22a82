"""`callbacks.attention_stats.head_stats`: per-head statistics that separate a self-gated head
from a uniform one, where the head-averaged views (`fig7`, `layer_masses`) cannot."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks.attention_stats import head_stats, layer_masses


def casa_record(n_img: int, Lq: int, heads: list[str]) -> dict:
    """One CASA window, keys [image (n_img) | text (Lq)], causal: query j sees n_img + j + 1 keys.
    "uniform": equal weights; "self": all weight on its own key."""
    probs = torch.zeros(len(heads), Lq, n_img + Lq)
    for h, kind in enumerate(heads):
        for j in range(Lq):
            if kind == "uniform":
                probs[h, j, :n_img + j + 1] = 1.0 / (n_img + j + 1)
            else:
                probs[h, j, n_img + j] = 1.0
    return {"kind": "casa", "layer": 3, "probs": [probs], "window_cu_image": [0, n_img], "window_cu_text": [0, Lq]}


def test_a_self_gated_head_and_a_uniform_head_are_told_apart():
    n_img, Lq = 64, 4
    rec = casa_record(n_img, Lq, ["uniform", "self"])
    uniform, gated = head_stats([rec])[3]
    keys = [n_img + j + 1 for j in range(Lq)]
    assert uniform["entropy"] == pytest.approx(sum(math.log(k) for k in keys) / Lq)
    assert uniform["entropy"] == pytest.approx(uniform["entropy_uniform"])
    assert uniform["self_x_keys"] == pytest.approx(1.0)
    assert uniform["image_mass"] == pytest.approx(sum(n_img / k for k in keys) / Lq)
    assert uniform["image_per_key"] == pytest.approx(uniform["text_per_key"])  # 1/keys on every key
    assert gated["entropy"] == pytest.approx(0.0, abs=1e-9)
    assert gated["self_x_keys"] == pytest.approx(sum(keys) / Lq)
    assert gated["image_mass"] == 0.0 and gated["text_mass"] == pytest.approx(1.0)
    # averaged over the two heads, the mass view sees a half-gated layer, not one gate and one flat head
    assert layer_masses([rec])[3]["self"] == pytest.approx(0.5 + 0.5 * sum(1 / k for k in keys) / Lq)


def test_cross_attention_heads_have_no_self_term():
    probs = torch.full((2, 3, 16), 1 / 16)
    rec = {"kind": "ca", "layer": 0, "probs": [probs], "window_cu_image": [0, 16], "window_cu_text": [0, 3]}
    (h0, h1) = head_stats([rec])[0]
    assert h0["entropy"] == pytest.approx(math.log(16)) and h0["entropy_uniform"] == pytest.approx(math.log(16))
    assert h0["self_x_keys"] == 0.0 and h0["image_mass"] == pytest.approx(1.0)


def test_attention_maps_at_start_captures_step_0_with_per_head_stats(tmp_path):
    import json

    import lightning as L

    from callbacks.attention_maps import AttentionMaps
    from tests.helpers import tiny_datamodule, tiny_module

    cb = AttentionMaps(every_n_steps=100, at_start=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[cb], default_root_dir=tmp_path / "run")
    module = tiny_module()
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path))
    H = module.model.backbone.config.num_attention_heads
    steps = sorted(p.name for p in (tmp_path / "run" / "attention").iterdir())
    assert steps == ["step_000000", "step_000001"]  # before the first step, and the end of fit
    heads = json.loads((tmp_path / "run" / "attention" / "step_000000" / "fig7.json").read_text())["heads"]
    assert set(heads) == {"0", "1"} and all(len(h) == H for h in heads.values())  # 2 CASA layers x H heads
    assert all(0 < h["entropy"] <= h["entropy_uniform"] + 1e-9 for layer in heads.values() for h in layer)
