"""Gradient accumulation under FSDP2: gradients are reduce-scattered only on the micro-batch
Lightning steps on (`CasaModule.training_step` sets `set_requires_gradient_sync`), and the
gradients that reach the optimizer equal those of syncing on every micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"

_REDUCE_SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor")
"""The collectives FSDP2 reduces gradients with (`DefaultReduceScatter` calls the first)."""


class _Counter:
    """Counts calls of the reduce-scatter collectives of `torch.distributed` while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self._saved = {}

    def install(self) -> "_Counter":
        for name in _REDUCE_SCATTERS:
            orig = getattr(dist, name)
            self._saved[name] = orig

            def counting(*args, _orig=orig, **kwargs):
                self.calls += 1
                return _orig(*args, **kwargs)

            setattr(dist, name, counting)
        return self

    def uninstall(self) -> None:
        for name, orig in self._saved.items():
            setattr(dist, name, orig)


class ReduceScatterProbe(L.Callback):
    """Per training micro-batch of this rank: how many reduce-scatters ran, and whether the
    optimizer stepped on it. Written to `<run_dir>/reduce_scatters_rank<r>.json` at the end."""

    def setup(self, trainer, pl_module, stage) -> None:
        self.counter = _Counter().install()
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before, self._stepped = self.counter.calls, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({"epoch": trainer.current_epoch, "batch_idx": batch_idx, "image_tokens": batch.num_image_tokens,
                          "reduce_scatters": self.counter.calls - self._before, "stepped": self._stepped})

    def teardown(self, trainer, pl_module, stage) -> None:
        self.counter.uninstall()
        out = Path(trainer.default_root_dir) / f"reduce_scatters_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.rows))


@pytest.mark.distributed
def test_fsdp2_reduce_scatters_only_on_the_micro_batch_that_steps(tmp_path):
    """2 gloo processes, the FSDP2 recipe (fsdp2_h100.yaml on CPU), accumulate 2 over epochs of
    3 batches: Lightning steps after batches 2 and 3 of the first epoch (the epoch's last
    batch ends the accumulation early) and after batch 2 of the next, 3 steps in all. Gradients
    must be reduce-scattered on those micro-batches only: before the fix, on all five.

    The same run checks `TokenThroughput`'s global image tokens/s (instruments.yaml: a window
    of 2 micro-batches, logged every step): it sums both ranks' image tokens of the window,
    so global / device = (rank 0's + rank 1's) / rank 0's tokens of the step's micro-batch."""
    import csv

    from tests.test_configs import DEMO, FSDP2_CPU, INSTRUMENTS, TINY, _env, fit_args

    shared = tmp_path / "runs" / "test-synth"
    shared.parent.mkdir()
    files = [DEMO, TINY, CONFIGS / "trainer" / "fsdp2_h100.yaml", FSDP2_CPU, INSTRUMENTS]
    run = tmp_path / "acc"
    args = fit_args(files, run, "--trainer.max_steps", "3", "--trainer.limit_train_batches", "3",
                    "--trainer.limit_val_batches", "0", "--trainer.callbacks+=tests.test_accumulation.ReduceScatterProbe")
    r = subprocess.run([sys.executable, "-m", "experiments.fit", *args], cwd=tmp_path, capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    for rank in (0, 1):
        rows = json.loads((run / f"reduce_scatters_rank{rank}.json").read_text())
        assert [(x["epoch"], x["batch_idx"], x["stepped"]) for x in rows] == [
            (0, 0, False), (0, 1, True), (0, 2, True), (1, 0, False), (1, 1, True)], rows
        per_step = {x["reduce_scatters"] for x in rows if x["stepped"]}
        assert len(per_step) == 1 and per_step.pop() > 0, rows  # every parameter group, once per step
        assert [x["reduce_scatters"] for x in rows if not x["stepped"]] == [0, 0], rows
    ranks = [json.loads((run / f"reduce_scatters_rank{r}.json").read_text()) for r in (0, 1)]
    with open(run / "csv" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train/image_tokens_per_sec")]
    assert len(logged) == 3  # one per optimizer step (the window of 2 is full from the first)
    stepping = [i for i, x in enumerate(ranks[0]) if x["stepped"]]
    for row, i in zip(logged, stepping):
        mine, both = ranks[0][i]["image_tokens"], ranks[0][i]["image_tokens"] + ranks[1][i]["image_tokens"]
        assert mine > 0 and both > mine, (mine, both)
        device, total = float(row["train/device/image_tokens_per_sec"]), float(row["train/image_tokens_per_sec"])
        assert total * mine == pytest.approx(device * both, rel=1e-5), (row, mine, both)


def _accumulate(rank: int, init: str, out: Path) -> None:
    """One rank: the tiny CASA⊕ model sharded as `CasaModule.configure_model` shards it (fp32
    reduction), two micro-batches of its own, gradients reduced on every micro-batch ("always")
    or only on the last ("last"). Saves the full gradients and reduce-scatter counts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from casa.fusion import CASA
    from casa.tiny import random_packed_batch, tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        layouts = [[[("text", 5), ("image", (4, 4)), ("text", 9)], [("text", 7)]],
                   [[("image", (2, 4)), ("text", 6), ("image", (2, 2)), ("text", 4)]]]
        batches = [random_packed_batch(layouts[(rank + i) % 2], seed=10 * rank + i) for i in range(2)]
        result = {}
        for mode in ("always", "last"):
            model = tiny_model(CASA("plus"), hidden_size=32, num_layers=2)
            mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
            for block in [*model.backbone.layers, *model.vision.tower.blocks]:
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
            model.activation_checkpointing = True
            counter = _Counter().install()
            try:
                for i, batch in enumerate(batches):
                    if mode == "last":
                        model.set_requires_gradient_sync(i == len(batches) - 1)
                    (model(batch).loss / len(batches)).backward()  # Lightning's accumulation scaling
            finally:
                counter.uninstall()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            result[mode] = {"grads": grads, "reduce_scatters": counter.calls}
        if rank == 0:
            torch.save(result, out)
        # both ranks done with every collective before either tears gloo down: a rank that
        # destroys its group while the other still runs one aborts (std::terminate, SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_syncing_only_the_last_micro_batch_gives_the_always_sync_gradients(tmp_path):
    """FSDP2's no-sync accumulation on our model (activation checkpointing, two ranks with
    different batches): the same gradients as reducing every micro-batch, with half the
    reduce-scatters."""
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_accumulate, args=(f"file://{tmp_path / 'pg'}", out), nprocs=2)
    result = torch.load(out)
    always, last = result["always"], result["last"]
    assert last["reduce_scatters"] * 2 == always["reduce_scatters"] > 0
    assert always["grads"].keys() == last["grads"].keys() and len(always["grads"]) > 10
    for name, g in always["grads"].items():
        torch.testing.assert_close(last["grads"][name], g, atol=1e-6, rtol=1e-5, msg=name)
