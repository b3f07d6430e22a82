"""The streaming dataset and DataModules: bad input, shard errors, rank/worker splitting,
resume at the same data position, validation rows, inspect/bench CLIs."""

import itertools
import json
import logging
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import resolve_tokenizer
from data import bench
from data import inspect as data_inspect
from data.datamodule import ImageDataModule, MixtureDataModule, VideoDataModule, expand_shards
from data.dataset import SampleProcessor, ShardStream
from data.format import make_sample, text
from tests.data_fixtures import conv, good_samples, png, raw, write


@pytest.fixture(scope="module")
def tok():
    return resolve_tokenizer("char")


def _stream(urls, tok, **kw):
    args = dict(shuffle=False, repeat=False)
    args.update(kw)
    packer = args.pop("packer", dict(max_text_tokens=256, max_image_tokens=64))
    return ShardStream(urls, SampleProcessor(ChatTemplate("helium", tok), max_pixels=56 * 56), packer, **args)


def _keys(batches):
    return [m["key"] for b in batches for m in b.meta]


def test_each_bad_input_is_counted_by_reason_and_no_good_sample_is_lost(tmp_path, tok, caplog):
    good = good_samples(6, "good")
    bad = [
        raw("corrupt", conv(), {"img0.png": b"\x89PNG not really"}),
        raw("badjson", b"{not json", {"img0.png": png()}),
        raw("missing", conv(refs=("img7",)), {"img0.png": png()}),
        raw("empty", conv(answer="  "), {"img0.png": png()}),
        raw("huge", conv(question="x" * 600), {"img0.png": png()}),
    ]
    interleaved = [x for pair in itertools.zip_longest(good, bad) for x in pair if x is not None]
    shards = write(tmp_path, "train", interleaved)
    with tarfile.open(tmp_path / "train-999999.tar", "w"):
        pass  # an empty shard
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        ds = _stream(shards + [str(tmp_path / "train-999999.tar")], tok)
        batches = list(ds.batches())
    assert sorted(_keys(batches)) == [f"good{i:03d}" for i in range(6)]
    st = ds.stats()
    for reason in ("corrupt_image", "malformed_json", "missing_image", "empty_answer", "oversize", "empty_shard"):
        assert st[reason] == 1, (reason, st)
    assert st["samples_read"] == 11 and st["samples_kept"] == 6
    for key in ("corrupt", "badjson", "missing", "empty", "huge", "train-999999.tar"):
        assert key in caplog.text
    assert "refers to image 'img7'" in caplog.text


def test_structurally_wrong_json_is_malformed_not_a_crash(tmp_path, tok):
    cases = [b"[1, 2]", b'{"messages": "hi"}', b'{"messages": [{"role": "robot", "content": []}]}',
             b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
             b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}',
             json.dumps({**conv(), "video": {"frames": ["f0"], "timestamps": []}}).encode()]
    shards = write(tmp_path, "train", [raw(f"m{i}", c, {"img0.png": png()}) for i, c in enumerate(cases)]
                   + good_samples(1))
    ds = _stream(shards, tok)
    assert _keys(ds.batches()) == ["s000"]
    assert ds.stats()["malformed_json"] == len(cases)


def test_truncated_and_garbage_tars_do_not_stop_the_stream(tmp_path, tok):
    shards = write(tmp_path, "train", good_samples(8), max_count=4)
    data = open(shards[0], "rb").read()
    open(shards[0], "wb").write(data[: len(data) // 2])  # tar reads stop early at the cut
    garbage = tmp_path / "train-000009.tar"
    garbage.write_bytes(bytes(range(256)) * 20)
    ds = _stream([*shards, str(garbage)], tok)
    keys = _keys(ds.batches())
    assert keys[-4:] == ["s004", "s005", "s006", "s007"] and 4 < len(keys) < 8
    assert keys[:-4] == [f"s{i:03d}" for i in range(len(keys) - 4)]
    st = ds.stats()
    assert st["corrupt_shard"] == 1 and st["empty_shard"] == 0


def test_missing_shards_and_empty_patterns_fail_at_construction(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shards(str(tmp_path / "nope-*.tar"))
    with pytest.raises(ValueError, match="empty shard pattern"):
        expand_shards("")
    write(tmp_path, "train", good_samples(2))
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        expand_shards(str(tmp_path / "train-{000000..000001}.tar"))  # the second does not exist
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        ImageDataModule(train=str(tmp_path), val=str(tmp_path))  # a directory without val-*.tar
    with pytest.raises(FileNotFoundError, match="do not exist"):
        _stream([str(tmp_path / "gone.tar")], tok)
    assert expand_shards(str(tmp_path)) == expand_shards(str(tmp_path / "train-{000000..000000}.tar"))


@pytest.mark.parametrize("num_shards", [1, 5])
def test_two_ranks_by_two_workers_read_every_sample_exactly_once(tmp_path, tok, num_shards):
    shards = write(tmp_path, "train", good_samples(23), max_count=-(-23 // num_shards))
    assert len(shards) == num_shards
    seen = []
    for rank in range(2):
        ds = _stream(shards, tok, shuffle=True, seed=3, rank=rank, world_size=2)
        seen += _keys(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(seen) == [f"s{i:03d}" for i in range(23)]


def _dm(tmp_path, workers, **kw):
    args = dict(train=str(tmp_path), max_text_tokens=96, max_image_tokens=64, max_pixels=56 * 56,
                num_workers=workers, seed=5, shuffle_buffer=8, pack_buffer=4)
    args.update(kw)
    return ImageDataModule(**args)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_by_hand_continues_at_the_same_batch(tmp_path, workers):
    write(tmp_path, "train", good_samples(30, answer_len=5), max_count=10)
    ref = [b.input_ids.tolist() for b in itertools.islice(_dm(tmp_path, workers).train_dataloader(), 14)]
    dm = _dm(tmp_path, workers)
    first = [b.input_ids.tolist() for b in itertools.islice(dm.train_dataloader(), 7)]
    state = dm.state_dict()
    assert state["batches_consumed"] == 7 and first == ref[:7]
    dm2 = _dm(tmp_path, workers)
    dm2.load_state_dict(state)
    assert [b.input_ids.tolist() for b in itertools.islice(dm2.train_dataloader(), 7)] == ref[7:14]
    with pytest.raises(ValueError, match="seed"):
        _dm(tmp_path, workers, seed=6).load_state_dict(state)


class _Recorder:
    """A LightningModule recording the batches it trains on (one parameter, real optimiser steps)."""

    @staticmethod
    def make(seen):
        import lightning as L

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(()))

            def training_step(self, batch, batch_idx):
                seen.append(batch.input_ids.tolist())
                return (self.w - batch.input_ids.float().mean()) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return M()


def _fit(dm, max_steps, ckpt_dir=None, ckpt_path=None, **trainer_kw):
    import lightning as L

    seen = []
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True,
                                                             save_top_k=0))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
                        **trainer_kw)
    trainer.fit(_Recorder.make(seen), datamodule=dm, ckpt_path=ckpt_path)
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_resume_from_checkpoint_yields_what_an_uninterrupted_run_yields(tmp_path, workers):
    data = tmp_path / "shards"
    write(data, "train", good_samples(30, answer_len=5), max_count=10)
    full = _fit(_dm(data, workers), 9)
    first = _fit(_dm(data, workers), 5, ckpt_dir=tmp_path / "ckpt")  # odd: workers rotate on resume
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["ImageDataModule"]["batches_consumed"] == 5
    rest = _fit(_dm(data, workers), 9, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert first + rest == full


def test_lightning_epochs_continue_the_stream_instead_of_restarting(tmp_path):
    write(tmp_path, "train", good_samples(30, answer_len=5), max_count=10)
    full = _fit(_dm(tmp_path, 0), 8)
    epochs = _fit(_dm(tmp_path, 0), -1, max_epochs=4, limit_train_batches=2)
    assert epochs == full


def test_validation_is_deterministic_and_carries_answers(tmp_path):
    write(tmp_path, "val", good_samples(9), max_count=4)
    write(tmp_path, "train", good_samples(2))
    dm = _dm(tmp_path, 2, val=str(tmp_path), val_rows_samples=4)
    a = list(dm.val_dataloader())
    b = list(dm.val_dataloader())
    assert [x.input_ids.tolist() for x in a] == [x.input_ids.tolist() for x in b]
    metas = [m for x in a for m in x.meta]
    assert sorted(m["key"] for m in metas) == [f"s{i:03d}" for i in range(9)]
    assert all(x.num_samples <= 4 for x in a)
    tok = dm.tokenizer
    for x in a:
        for m, lo in zip(x.meta, x.sample_cu_seqlens.tolist()):
            assert m["answer"] == m["key"][-1] and m["task"] == "t" and m["group"] == "g"
            assert tok.decode(x.input_ids[lo:lo + m["prompt_len"]].tolist()).endswith("<|assistant|>")


def test_video_and_mixture_datamodules(tmp_path):
    frames = {f"f{i:03d}.png": png((56, 56), (10 * i, 0, 0)) for i in range(6)}
    video = {"messages": [{"role": "user", "content": [{"type": "video"}, text("Which way?")]},
                          {"role": "assistant", "content": [text("left")]}],
             "video": {"frames": [f"f{i:03d}" for i in range(6)], "timestamps": [i * 0.5 for i in range(6)]},
             "task": "video_direction", "group": "video"}
    write(tmp_path / "video", "train", [make_sample(f"v{i}", video, frames) for i in range(4)])
    write(tmp_path / "image", "train", good_samples(8))
    write(tmp_path / "image", "val", good_samples(3, "iv"))
    write(tmp_path / "video", "val", [make_sample(f"vv{i}", video, frames) for i in range(2)])
    common = dict(max_text_tokens=96, max_image_tokens=64, max_pixels=56 * 56, seed=1)
    vdm = VideoDataModule(train=str(tmp_path / "video"), frame_max_pixels=56 * 56, **common)
    b = next(iter(vdm.train_dataloader()))
    b.validate()
    assert b.num_images == 6 * b.num_samples and b.num_windows == 2 * b.num_samples  # (<|user|>)(frames + QA)
    vdm = VideoDataModule(train=str(tmp_path / "video"), val=str(tmp_path / "video"), frame_max_pixels=56 * 56,
                          num_workers=2, **common)
    idm = ImageDataModule(train=str(tmp_path / "image"), val=str(tmp_path / "image"), num_workers=2, **common)
    mix = MixtureDataModule(idm, vdm, ratio=0.75, seed=2)
    val_keys = sorted(m["key"] for x in mix.val_dataloader() for m in x.meta)  # one loader, both streams
    assert val_keys == ["iv000", "iv001", "iv002", "vv0", "vv1"]
    kinds = [m["task"] for x in itertools.islice(mix.train_dataloader(), 40) for m in x.meta[:1]]
    assert 0.6 < kinds.count("t") / len(kinds) < 0.9 and "video_direction" in kinds
    with pytest.raises(ValueError, match="ratio=1.5"):
        MixtureDataModule(mix.image, vdm, ratio=1.5)
    with pytest.raises(ValueError, match="layout='live'"):
        VideoDataModule(train=str(tmp_path / "video"), layout="live")


def test_inspect_json_and_bench(tmp_path, capsys):
    samples = good_samples(5) + [raw("badjson", b"{", {"img0.png": png()})]
    write(tmp_path, "train", samples)
    data_inspect.main([str(tmp_path), "--json", "--max-pixels", str(56 * 56), "--max-text-tokens", "128"])
    out = json.loads(capsys.readouterr().out)
    for key in ("samples_read", "samples_kept", "skipped", "rows", "fill_text", "fill_image"):
        assert key in out
    assert out["samples_read"] == 6 and out["samples_kept"] == 5 and out["skipped"] == {"malformed_json": 1}
    assert sum(b["count"] for b in out["text_tokens"]) == 5 and 0 < out["fill_text"] <= 1
    r = bench.run(str(tmp_path), max_pixels=56 * 56, max_text_tokens=128, max_batches=6)
    assert r["batches"] == 6 and r["samples_per_s"] > 0 and 0 < r["fill_text"] <= 1


def test_train_samples_per_row_one_is_no_packing(tmp_path):
    """`train_samples_per_row=1`: one sample per training row (the paper's video training, §4.1:
    "do not employ sequence packing"); the default packs as many as the caps take."""
    write(tmp_path, "train", good_samples(12), max_count=12)
    packed = next(iter(_dm(tmp_path, 0).train_dataloader()))
    alone = [b.num_samples for b in itertools.islice(_dm(tmp_path, 0, train_samples_per_row=1).train_dataloader(), 4)]
    assert packed.num_samples > 1 and alone == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="train_samples_per_row=0 must be >= 1"):
        _dm(tmp_path, 0, train_samples_per_row=0)
