"""Callbacks on tiny models: attention maps against hand computations, files written only on
capture steps, memory numbers that follow the batch size, gate curves."""

import json

import lightning as L
import pytest
import torch
from PIL import Image

from callbacks.attention_maps import AttentionMaps
from callbacks.attention_stats import fig7, layer_masses, window_masses
from callbacks.gates import GateMonitor
from callbacks.memory import MemoryMonitor
from callbacks.throughput import TokenThroughput
from casa.fusion import GatedCrossAttention
from tests.helpers import tiny_datamodule, tiny_module


def _record():
    # one window: 2 image keys, 2 text queries; keys [I0 I1 | t0 t1]; 1 head
    #   q0: I0 .2  I1 .3  t0(self) .5   t1 -
    #   q1: I0 .1  I1 .1  t0 .2         t1(self) .6
    p = torch.tensor([[[0.2, 0.3, 0.5, 0.0], [0.1, 0.1, 0.2, 0.6]]])
    return {"layer": 0, "kind": "casa", "probs": [p], "window_cu_text": [0, 2], "window_cu_image": [0, 2]}


def test_fig7_equals_a_hand_computation():
    s = fig7([_record()], group=1, special_ids={"vision_end": 7}, input_ids=torch.tensor([7, 3]))
    assert s["self"] == pytest.approx((0.5 + 0.6) / 2)
    assert s["text"] == pytest.approx(0.2)  # only q1 has another text key, t0 with 0.2
    assert s["image_groups"] == pytest.approx([(0.2 + 0.1) / 2, (0.3 + 0.1) / 2])
    assert s["image_mean"] == pytest.approx(((0.2 + 0.3) / 2 + (0.1 + 0.1) / 2) / 2)
    assert s["vision_end"] == pytest.approx((0.5 + 0.2) / 2)  # t0 is <|vision_end|>, seen by q0 and q1
    m = window_masses(_record()["probs"][0], 2)
    torch.testing.assert_close(m["self"] + m["text"] + m["image"], torch.ones(1, 2))
    lm = layer_masses([_record()])[0]
    assert lm == pytest.approx({"self": 0.55, "text": 0.1, "image": 0.35})


def _trainer(tmp_path, callbacks, steps=5, **kw):
    return L.Trainer(default_root_dir=tmp_path / "run", max_steps=steps, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **kw)


def test_attention_maps_written_on_capture_steps_only(tmp_path):
    cb = AttentionMaps(every_n_steps=2)
    module = tiny_module()
    dm = tiny_datamodule(tmp_path)
    calls = []
    orig = module.model.capture_attention

    def counting():
        calls.append(module.trainer.global_step)
        return orig()

    module.model.capture_attention = counting
    _trainer(tmp_path, [cb]).fit(module, datamodule=dm)
    assert calls == [2, 4, 5]  # steps 2 and 4, and the end of fit
    steps = sorted(p.name for p in (tmp_path / "run" / "attention").iterdir())
    assert steps == ["step_000002", "step_000004", "step_000005"]
    out = tmp_path / "run" / "attention" / "step_000004"
    for png in ["fig7.png", "layer_00.png", "layer_01.png"]:
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    data = json.loads((out / "fig7.json").read_text())
    masses = data["layers"]["0"]
    assert masses["self"] + masses["text"] + masses["image"] == pytest.approx(1.0, abs=1e-4)
    assert module.model._capture is None


def test_captured_probabilities_sum_to_one(tmp_path):
    module = tiny_module()
    dm = tiny_datamodule(tmp_path)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad(), module.model.capture_attention() as records:
        module.model.eval()(batch)
    for r in records:
        for p in r["probs"]:
            if p.shape[1]:
                torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5, rtol=1e-5)


class _Allocating(L.LightningModule):
    """Activations proportional to the batch size (what the memory monitor must follow)."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch
        self.lin = torch.nn.Linear(512, 512)

    def training_step(self, x, i):
        h = torch.randn(self.batch, 512)
        for _ in range(4):
            h = torch.relu(self.lin(h))
        return h.square().mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(8), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_memory_monitor_follows_the_batch_size(tmp_path):
    peaks = []
    for batch in (256, 16384):
        cb = MemoryMonitor(every_n_steps=1)
        _trainer(tmp_path, [cb], steps=4).fit(_Allocating(batch))
        peaks.append(max(h["peak_rss_bytes"] for h in cb.history))
    # 16384 x 512 floats x (several live activations) is well above 100 MiB more
    assert peaks[1] > peaks[0] + 100 * 2 ** 20


def test_gate_monitor_and_throughput(tmp_path):
    gm = GateMonitor(every_n_steps=1)
    module = tiny_module(GatedCrossAttention(), lr_new=0.05)
    dm = tiny_datamodule(tmp_path)
    _trainer(tmp_path, [gm, TokenThroughput(window_size=2)], steps=4).fit(module, datamodule=dm)
    assert len(gm.history) == 4 and set(gm.history[0][1]) == {0, 1}
    assert gm.history[0][1][0] != 0.0  # the gates moved away from their zero init
    assert (tmp_path / "run" / "gates.png").is_file()
