"""Validation in lock-step across ranks, and the same numbers as one process.

The validation set below packs into 5 rows of at most 2 samples (9 samples), so two ranks
split it 3 : 2; the tasks are laid out so that the ranks meet them in different orders
and task "c" (group "g2") only ever reaches rank 0:

    row      r0      r1      r2      r3      r4
    samples  s0 s1   s2 s3   s4 s5   s6 s7   s8
    tasks    a  b    b  a    c  a    b  b    c
    rank     0       1       0       1       0      (rank 1 then gets a padding row)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

import casa.train.module
from casa.train.metrics import METRICS, GroupedAnswerMetrics
from casa.train.module import _is_padding
from data.datamodule import ImageDataModule
from data.dataset import ShardStream
from data.format import make_sample
from data.packing import build_row
from tests.data_fixtures import conv, png, sample, write
from tests.helpers import tiny_module

TASKS = ["a", "b", "b", "a", "c", "a", "b", "b", "c"]
KEYS = [f"s{i}" for i in range(len(TASKS))]


def _data(root: Path) -> Path:
    samples = [make_sample(k, conv(answer=f"x{i}", task=t, group="g2" if t == "c" else "g1"), {"img0.png": png()})
               for i, (k, t) in enumerate(zip(KEYS, TASKS))]
    write(root, "val", samples)
    write(root, "train", samples[:2])
    return root


def _datamodule(root: Path) -> ImageDataModule:
    return ImageDataModule(train=str(root), val=str(root), max_text_tokens=256, max_image_tokens=64,
                           max_pixels=56 * 56, val_rows_samples=2)


def _rows(batches) -> list[list[tuple[str, bool]]]:
    return [[(m["key"], bool(m.get("padding", False))) for m in b.meta] for b in batches]


# ---------------------------------------------------------------------------- metrics on the module's device
def test_lazily_created_metric_sets_live_on_the_module_device():
    metrics = GroupedAnswerMetrics(["declared"]).to("meta")  # .to(device) before any key is seen, as Lightning does
    metrics.update(["seen.later"], ["1"], ["1"])
    states = {(key, name): (m.total.device.type, m.count.device.type)
              for key, ms in metrics.sets.items() for name, m in ms.items()}
    assert len(states) == 2 * len(METRICS) and set(states.values()) == {("meta", "meta")}, states


# ---------------------------------------------------------------------------- even validation batches
def test_every_rank_gets_the_same_number_of_validation_batches_and_each_sample_once(tmp_path):
    dm = _datamodule(_data(tmp_path))
    single = _rows(dm.val_dataloader())
    assert [len(r) for r in single] == [2, 2, 2, 2, 1]  # the layout of the module doc
    per_rank = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        per_rank.append(_rows(dm.val_dataloader()))
    assert [len(r) for r in per_rank] == [3, 3]
    # rank r takes the single-process rows r, r+2, ...; the short rank ends with a padding row
    assert per_rank[0] == single[0::2]
    assert per_rank[1][:2] == single[1::2]
    assert all(pad for _, pad in per_rank[1][2])
    real = sorted(k for rows in per_rank for row in rows for k, pad in row if not pad)
    assert real == sorted(KEYS)
    # DataLoader workers of one rank take its rows in turn: same rows, same order
    workers = _rows(DataLoader(dm.val_stream(), batch_size=None, num_workers=2))
    assert workers == per_rank[1]


def test_even_batches_need_one_pass_and_padding_batches_are_whole(tmp_path):
    dm = _datamodule(_data(tmp_path))
    with pytest.raises(ValueError, match="equal_batches=True .* not repeat=True"):
        ShardStream(dm.val_urls, dm.processor(), dm._packer(eval_rows=True), repeat=True, equal_batches=True)
    row = build_row([sample(3, key="real"), sample(2, key="filler")])
    row.meta[1]["padding"] = True
    with pytest.raises(ValueError, match=r"mixes padding and real samples: meta padding flags \[False, True\]"):
        _is_padding(row)


# ---------------------------------------------------------------------------- 2 ranks == 1 process
def _answers_half_right(real_generate, tok, calls: list[int]):
    """`generate` that runs the real generation (same forwards, same lock-step) but answers
    the samples with an even index correctly, so that scores are neither 0 nor 1 and a
    sample counted twice, or on the wrong task, changes them."""
    def generate(model, prompts, *args, **kwargs):
        out = real_generate(model, prompts, *args, **kwargs)
        calls.append(sum(not m.get("padding", False) for m in prompts.meta))
        return [tok.encode(m["answer"], add_special_tokens=False) if int(m["key"][1:]) % 2 == 0 else g
                for m, g in zip(prompts.meta, out)]
    return generate


class _Rows(L.Callback):
    def __init__(self) -> None:
        self.rows: list[list[tuple[str, bool]]] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows += _rows([batch])


def _validate(root: Path, devices: int, val_max_samples: int) -> dict:
    dm = _datamodule(root)
    calls: list[int] = []
    real_generate = casa.train.module.generate
    casa.train.module.generate = _answers_half_right(real_generate, dm.tokenizer, calls)
    try:
        rows = _Rows()
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[rows], default_root_dir=root / "run")
        module = tiny_module(val_max_samples=val_max_samples, val_max_new_tokens=3)
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    finally:
        casa.train.module.generate = real_generate
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "rows": rows.rows, "generated": calls}


def _rank(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")  # Lightning: externally launched ranks
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    out = {"uncapped": _validate(Path(root), world, 256), "capped": _validate(Path(root), world, 5)}
    Path(root, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()  # every collective done on both ranks before either tears gloo down
    torch.distributed.destroy_process_group()


def _run_ranks(root: Path, world: int = 2, timeout: float = 120.0) -> list[dict]:
    ctx = mp.start_processes(_rank, args=(world, str(root)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:  # a collective mismatch hangs rather than fails on some backends
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} validation ranks still running after {timeout} s (ranks out of lock-step?)")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(world)]


def _loss_per_answer_token(root: Path) -> float:
    """The reference val/loss: cross-entropy summed over every answer token of the set / their number."""
    model = tiny_module().model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for b in _datamodule(root).val_dataloader():
            out = model(b)
            total, tokens = total + float(out.loss) * out.num_targets, tokens + out.num_targets
    return total / tokens


@pytest.mark.distributed
def test_two_rank_validation_matches_one_process(tmp_path):
    root = _data(tmp_path)
    single = _validate(root, 1, 256)
    ranks = _run_ranks(root)

    # lock-step: the same number of validation steps and of generate calls on both ranks
    assert [len(r["uncapped"]["rows"]) for r in ranks] == [3, 3]
    assert [len(r["uncapped"]["generated"]) for r in ranks] == [3, 3]
    real = sorted(k for r in ranks for row in r["uncapped"]["rows"] for k, pad in row if not pad)
    assert real == sorted(KEYS)  # every sample scored exactly once

    one = single["metrics"]
    assert one["val/loss"] == pytest.approx(_loss_per_answer_token(root), rel=1e-5)
    assert {"val/loss", "val_task/c/exact_match", "val_group/g2/anls"} <= set(one)
    assert 0.0 < one["val_task/a/exact_match"] < 1.0  # the scores say something (see _answers_half_right)
    for r in ranks:
        both = r["uncapped"]["metrics"]
        assert set(both) == set(one)
        for k, v in one.items():
            assert both[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k

    # val_max_samples=5 counts over both ranks: step 1 generates 2 + 2 samples, step 2 another
    # 2 + 2 (4 < 5), then no rank generates; per rank, rank 0 would have gone on alone
    assert [r["capped"]["generated"] for r in ranks] == [[2, 2], [2, 2]]
