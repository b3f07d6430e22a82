"""Attention maps with several ranks (issue 26 item 6): only rank zero needs a validation
batch with images; the other ranks join the capture forward with any batch of theirs. One
validation shard split over 2 FSDP2 ranks (gloo, CPU), its only image sample on one rank:

    val shard   v0 v1 v2 v3        one sample per row: 4 batches
    rank 0      v0    v2           "zero": v0 has the image (rank 1 holds text only)
    rank 1         v1    v3        "one":  v1 has the image (sent to rank zero once)

Before, the capture was skipped on every rank unless every rank had an image batch, with no
word: no attention map was written."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from callbacks.attention_maps import AttentionMaps, plan_capture
from data.datamodule import ImageDataModule
from data.format import make_sample
from tests.data_fixtures import conv, png, write
from tests.helpers import tiny_module


# ---------------------------------------------------------------------------- the decision, one process
def test_plan_capture_needs_an_image_batch_on_some_rank_and_a_batch_on_every_rank():
    assert plan_capture([True, False], [True, True]) == (0, None)  # rank zero's own; rank 1 joins with text
    assert plan_capture([False, False, True], [True, True, True]) == (2, None)  # rank 2's, sent to rank zero
    src, why = plan_capture([False, False], [True, True])
    assert src is None and "no rank has a validation batch with images" in why
    src, why = plan_capture([True, False, False], [True, True, False])
    assert src is None and "rank(s) [2] have no validation batch" in why
    assert plan_capture([True], [True]) == (0, None)


def _data(root: Path, image_at: int | None) -> Path:
    samples = [make_sample(f"v{i}", conv(answer=f"a{i}", refs=("img0",) if i == image_at else ()),
                           {"img0.png": png()} if i == image_at else {}) for i in range(4)]
    write(root, "val", samples)
    write(root, "train", [make_sample(f"t{i}", conv(answer=f"b{i}"), {"img0.png": png()}) for i in range(4)])
    return root


def _fit(root: Path, trainer_kw: dict) -> None:
    dm = ImageDataModule(train=str(root), val=str(root), max_text_tokens=256, max_image_tokens=64,
                         max_pixels=56 * 56, val_rows_samples=1)
    trainer = L.Trainer(default_root_dir=root / "run", max_steps=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[AttentionMaps(every_n_steps=1)],
                        **trainer_kw)
    trainer.fit(tiny_module(), datamodule=dm)


def test_no_image_batch_anywhere_is_said_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_data(tmp_path, image_at=None), {})
    said = [w for w in caught if "AttentionMaps: no rank has a validation batch with images" in str(w.message)]
    assert len(said) == 1  # two captures (step 1, end of fit), one warning
    assert not (tmp_path / "run" / "attention").exists()


# ---------------------------------------------------------------------------- 2 FSDP2 ranks
def _rank(rank: int, world: int, root: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")  # Lightning: externally launched ranks
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    for case in ("zero", "one"):
        _fit(Path(root) / case, dict(devices=world, strategy=ModelParallelStrategy(data_parallel_size=world,
                                                                                   tensor_parallel_size=1)))
    Path(root, f"rank{rank}.done").write_text("ok")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned ranks and four tiny fits: ~25 s of CPU (over a minute on a shared box)
@pytest.mark.distributed
def test_two_fsdp2_ranks_capture_when_one_rank_has_the_image_batch(tmp_path):
    for case, image_at in (("zero", 0), ("one", 1)):
        _data(tmp_path / case, image_at)
    ctx = mp.start_processes(_rank, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:  # a collective mismatch hangs rather than fails on some backends
            for p in ctx.processes:
                p.kill()
            pytest.fail("2 ranks still running after 180 s (capture forwards out of lock-step?)")
    assert all((tmp_path / f"rank{r}.done").is_file() for r in range(2))
    for case in ("zero", "one"):
        out = tmp_path / case / "run" / "attention" / "step_000001"
        assert (out / "fig7.png").is_file(), f"{case}: no attention map written"
        data = json.loads((out / "fig7.json").read_text())
        assert set(data["layers"]) == {"0", "1"}  # the tiny model's two fused layers
        masses = data["layers"]["0"]
        assert masses["image"] > 0 and masses["self"] + masses["text"] + masses["image"] == pytest.approx(1.0, abs=1e-4)
