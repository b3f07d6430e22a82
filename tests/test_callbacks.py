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
            if p.shape[1] and p.shape[2]:  # a window without key (eq. 3's indicator) attends to nothing
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


class _Metrics(L.pytorch.loggers.logger.Logger):
    """Keeps every `log_metrics` call: [(step, {key: value})]."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    name, version = "memory", 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


class _Batches(L.Callback):
    """What each training micro-batch held: (text tokens, image tokens, `training_flops`)."""

    def __init__(self):
        self.rows: list[tuple[int, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from casa.flops import training_flops

        self.rows.append((batch.num_text_tokens, batch.num_image_tokens, training_flops(pl_module.model, batch)))


def test_token_throughput_logs_image_tokens_and_flops_over_lightnings_window(tmp_path, recwarn):
    """Over each logged window (the last `window_size` micro-batches, so the tokens of all but
    the first of them), image tokens/s and FLOPs/s relate to Lightning's text tokens/s
    (`items_per_sec`) as the counted image tokens and FLOPs to the counted text tokens; logged
    once per optimizer step (accumulation 2), with no "flops_per_batch" warning."""
    window = 3
    logger, batches = _Metrics(), _Batches()
    module = tiny_module()
    dm = tiny_datamodule(tmp_path)
    trainer = L.Trainer(default_root_dir=tmp_path / "run", max_steps=5, accelerator="cpu", logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, accumulate_grad_batches=2, log_every_n_steps=1,
                        callbacks=[batches, TokenThroughput(window_size=window)])
    trainer.fit(module, datamodule=dm)
    assert not [w for w in recwarn if "flops_per_batch" in str(w.message)]
    logged = [m for _, m in logger.calls if "train/device/image_tokens_per_sec" in m]
    rates = [m for _, m in logger.calls if "train/device/items_per_sec" in m]
    assert len(logged) == len(rates) == 4  # steps 2..5: the window of 3 micro-batches is full from step 2
    assert len(batches.rows) == 10
    for i, (mine, lightning) in enumerate(zip(logged, rates)):
        last = 2 * (i + 2)  # micro-batches seen when optimizer step i + 2 closes
        rows = batches.rows[last - window + 1:last]  # the window's tokens: all but its first batch
        text, image, flops = (sum(r[j] for r in rows) for j in range(3))
        assert image > 0
        ratio = mine["train/device/image_tokens_per_sec"] / lightning["train/device/items_per_sec"]
        assert ratio == pytest.approx(image / text, rel=1e-6)
        ratio = lightning["train/device/flops_per_sec"] / lightning["train/device/items_per_sec"]
        assert ratio == pytest.approx(flops / text, rel=1e-6)
    assert "train/image_tokens_per_sec" not in logged[0]  # one process: device rates only, as Lightning's


class _SlowBackward(L.Callback):
    def on_before_backward(self, trainer, pl_module, loss):
        import time

        time.sleep(0.2)


def test_step_time_covers_every_micro_batch_of_an_optimizer_step(tmp_path):
    """`train/step_time_s` times an optimizer step: with 2 micro-batches of >= 0.2 s each, every
    logged value is at least 0.4 s (a per-micro-batch timer logged about 0.2 s)."""
    logger = _Metrics()
    trainer = L.Trainer(default_root_dir=tmp_path / "run", max_steps=3, accelerator="cpu", logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, accumulate_grad_batches=2, log_every_n_steps=1,
                        callbacks=[_SlowBackward()])
    trainer.fit(tiny_module(), datamodule=tiny_datamodule(tmp_path))
    times = [m["train/step_time_s"] for _, m in logger.calls if "train/step_time_s" in m]
    assert len(times) == 3 and min(times) >= 0.4, times
def test_attention_maps_and_memory_fire_once_per_optimizer_step(tmp_path):
    """accumulate_grad_batches=2: eight micro-batches make four optimizer steps, so four
    captures (and one at the end of fit) and four memory intervals, each after its step's
    last micro-batch; firing per micro-batch gave eight (global_step 0, 1, 1, 2, 2, ...)."""
    cb, mem = AttentionMaps(every_n_steps=1), MemoryMonitor(every_n_steps=1)
    module = tiny_module()
    calls = []
    orig = module.model.capture_attention

    def counting():
        calls.append((module.trainer.global_step, module.trainer.fit_loop.epoch_loop.batch_progress.current.ready))
        return orig()

    module.model.capture_attention = counting
    _trainer(tmp_path, [cb, mem], steps=4, accumulate_grad_batches=2).fit(module, datamodule=tiny_datamodule(tmp_path))
    assert calls == [(1, 2), (2, 4), (3, 6), (4, 8), (4, 8)]  # (optimizer step, micro-batches so far)
    assert [h["step"] for h in mem.history] == [1, 2, 3, 4]


def test_attention_capture_records_under_fsdp2_mixed_precision(tmp_path):
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16), as fsdp2_h100.yaml: the cast of each
    block's inputs rebuilds lists and dataclasses, so a capture list in the StreamContext was
    copied and the capture came back empty. The records must arrive, one per fused layer call,
    close to the plain fp32 model's (bf16 tolerances)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from casa.fusion import CASA
    from casa.tiny import random_packed_batch, tiny_model

    samples = [[("text", 5), ("image", (4, 4)), ("text", 7)], [("image", (2, 4)), ("text", 6)]]
    batch = random_packed_batch(samples, seed=1)
    plain, wrapped = tiny_model(CASA("plus")).eval(), tiny_model(CASA("plus")).eval()
    with torch.no_grad(), plain.capture_attention() as reference:
        plain(batch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in wrapped.backbone.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(wrapped, mp_policy=mp)
        with torch.no_grad(), wrapped.capture_attention() as records:
            wrapped(batch)
    finally:
        dist.destroy_process_group()
    assert [r["layer"] for r in records] == [r["layer"] for r in reference] == wrapped.fusion.fused_layers()
    for r, ref in zip(records, reference):
        assert r["probs"][0].dtype == torch.bfloat16  # the capture ran under the bf16 cast
        for p, q in zip(r["probs"], ref["probs"]):
            torch.testing.assert_close(p.float(), q, atol=2e-2, rtol=0)


def test_attention_maps_fail_loudly_when_a_capture_records_nothing(tmp_path):
    """A capture that loses its records (as under FSDP2 mixed precision before the
    AttentionRecorder) must stop the run, not write nothing."""
    from contextlib import contextmanager

    module = tiny_module()

    @contextmanager
    def losing():
        with orig():
            yield []  # the layers record into the model's recorder; the caller sees another list

    orig = module.model.capture_attention
    module.model.capture_attention = losing
    with pytest.raises(RuntimeError, match=r"AttentionMaps: the capture forward at step 1 recorded nothing for fused "
                                           r"layers \[0, 1\] of CASA \(got 0 records\)"):
        _trainer(tmp_path, [AttentionMaps(every_n_steps=1)], steps=1).fit(module, datamodule=tiny_datamodule(tmp_path))
