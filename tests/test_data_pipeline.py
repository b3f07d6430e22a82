"""Data pipeline: packing windows, labels, templates, images, video sampling, bad input,
splitting across ranks/workers, and resume of the stream position."""

import io
import json
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from data.datamodule import ImageDataModule, expand_shards, resolve_tokenizer
from data.dataset import SampleProcessor, ShardStream
from data.format import ShardWriter, encode_image, image, make_sample, text
from data.image import ImageError, decode_image, patchify, to_rgb
from data.packing import Packer, Sample, build_row, sample_windows
from data.templates import ChatTemplate
from data.video import expand_video, sample_frames


@pytest.fixture(scope="module")
def tok():
    return resolve_tokenizer("char")


def _png(size=(56, 56), color=(200, 30, 30), mode="RGB"):
    return encode_image(Image.new(mode, size, color if mode == "RGB" else 128))


def _conv(question="What colour?", answer="red", refs=("img0",)):
    return {"messages": [{"role": "user", "content": [*(image(r) for r in refs), text(question)]},
                         {"role": "assistant", "content": [text(answer)]}], "task": "t", "group": "g"}


def _write(tmp_path, name, samples, max_count=1000):
    with ShardWriter(tmp_path, name, max_count=max_count) as w:
        for s in samples:
            w.write(s)
    return w.shards


def test_windows_and_row_layout_match_the_ascii_picture():
    # sample 0:  t t [I I I I] t t t        sample 1: [I I] t t [I I I] t
    assert sample_windows([2], [4], 5) == ([0, 2, 5], [0, 0, 4])
    assert sample_windows([0, 2], [2, 3], 3) == ([0, 2, 3], [0, 2, 5])
    assert sample_windows([3, 3], [1, 1], 5) == ([0, 3, 5], [0, 0, 2])  # consecutive images share a window
    s0 = Sample([1] * 5, [False] * 5, [2], [torch.zeros(16, 1176)], [[1, 4, 4]], {"key": "a"})
    s1 = Sample([2] * 3, [False] * 3, [0, 2], [torch.zeros(8, 1176), torch.zeros(12, 1176)], [[1, 2, 4], [1, 2, 6]], {"key": "b"})
    row = build_row([s0, s1])
    row.validate()
    assert row.window_cu_seqlens_text.tolist() == [0, 2, 5, 7, 8]
    assert row.window_cu_seqlens_image.tolist() == [0, 0, 4, 6, 9]
    assert row.sample_cu_seqlens.tolist() == [0, 5, 8]
    assert row.image_text_position.tolist() == [2, 5, 7]


def test_labels_are_answers_only_pre_shifted_and_per_sample(tok):
    tpl = ChatTemplate("helium", tok)
    enc = tpl.encode(_conv()["messages"])
    s = Sample(enc.input_ids, enc.answer_mask, enc.image_positions, [torch.zeros(16, 1176)], [[1, 4, 4]], {})
    row = build_row([s, s])
    T = len(enc.input_ids)
    targets = [x for x in row.labels[:T].tolist() if x != -100]
    assert tok.decode(targets) == "red<|end|>"
    # the label at p is the token at p+1, and the last token of a sample has no target
    lab = row.labels[:T]
    idx = (lab != -100).nonzero().squeeze(-1)
    assert torch.equal(lab[idx], row.input_ids[idx + 1])
    assert row.labels[T - 1] == -100 and row.labels[-1] == -100
    assert tok.decode(enc.input_ids[:enc.prompt_len]).endswith("<|assistant|>")


def test_qwen_template_records_image_positions_at_vision_end(tok):
    tpl = ChatTemplate("qwen2_5_vl", tok)
    enc = tpl.encode(_conv(refs=("img0", "img1"))["messages"])
    vend = tok.convert_tokens_to_ids("<|vision_end|>")
    vstart = tok.convert_tokens_to_ids("<|vision_start|>")
    assert [enc.input_ids[p] for p in enc.image_positions] == [vend, vend]
    assert all(enc.input_ids[p - 1] == vstart for p in enc.image_positions)
    with pytest.raises(ValueError, match=r"template='llava' is not one of \['helium', 'qwen2_5_vl'\]"):
        ChatTemplate("llava", tok)


@pytest.mark.parametrize("mode", ["CMYK", "LA", "P", "RGBA", "L", "I;16"])
def test_unusual_modes_become_rgb(mode):
    img = Image.new(mode, (40, 30))
    if mode == "I;16":
        img = Image.fromarray(np.full((30, 40), 65535 // 2, dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # scaled to 8 bits, not clipped to 255
        assert abs(int(np.asarray(out)[0, 0, 0]) - 127) <= 1


def test_huge_image_is_downscaled_and_corrupt_bytes_raise():
    big = Image.new("RGB", (10000, 10000), (10, 200, 10))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=50)
    pv, grid = patchify(decode_image(buf.getvalue(), 448 * 448), 448 * 448)
    assert grid[1] * 14 * grid[2] * 14 <= 448 * 448 and grid[1] == grid[2]
    with pytest.raises(ImageError):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError):
        decode_image(buf.getvalue()[:2000])  # truncated


def test_patchify_equals_the_hugging_face_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)(images=[img], return_tensors="pt")
    pv, grid = patchify(img, 112 * 112)
    assert grid == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(pv, ref["pixel_values"])


def test_video_frame_sampling_rules():
    ts = [i / 10 for i in range(1000)]  # 100 s at 10 fps
    idx = sample_frames(ts, fps=2.0)
    assert len(idx) == 200 and all(abs(ts[b] - ts[a] - 0.5) < 1e-6 for a, b in zip(idx, idx[1:]))
    short = sample_frames([i / 10 for i in range(60)])  # 6 s: 20 uniform frames
    assert len(short) == 20 and short[0] == 0 and short[-1] == 59
    capped = sample_frames([i / 2 for i in range(2000)], max_duration=180.0)  # 1000 s
    assert [i / 2 for i in capped][-1] == 180.0


def test_video_layouts():
    conv = {"messages": [{"role": "user", "content": [{"type": "video"}, text("Which way?")]},
                         {"role": "assistant", "content": [text("left")]}],
            "video": {"frames": ["f0", "f1", "f2"], "timestamps": [0, 0.5, 1.0], "layout": "qa"}}
    qa = expand_video(conv, ["f0", "f1", "f2"], [0, 0.5, 1.0])
    assert [c.get("ref") for c in qa[0]["content"]] == ["f0", "f1", "f2", None]
    conv["video"].update(layout="caption", captions=[{"t": 0.6, "text": "it moves"}])
    cap = expand_video(conv, ["f0", "f1", "f2"], [0, 0.5, 1.0])
    said = [m["content"][0]["text"] for m in cap if m["role"] == "assistant"]
    assert said == ["", "", "it moves", ""]  # silent before frame 0, caption at the frame it happens
    imgs = [m["content"][0]["ref"] for m in cap if m["role"] == "user" and m["content"][0]["type"] == "image"]
    assert imgs == ["f0", "f1", "f2"]


def _bad_shards(tmp_path):
    good = [make_sample(f"good{i}", _conv(answer=f"a{i}"), {"img0.png": _png()}) for i in range(6)]
    bad = [
        {"__key__": "corrupt", "json": json.dumps(_conv()).encode(), "img0.png": b"\x89PNG not really"},
        {"__key__": "badjson", "json": b"{not json", "img0.png": _png()},
        {"__key__": "missing", "json": json.dumps(_conv(refs=("img7",))).encode(), "img0.png": _png()},
        {"__key__": "empty", "json": json.dumps(_conv(answer="  ")).encode(), "img0.png": _png()},
        {"__key__": "huge", "json": json.dumps(_conv(question="x" * 600)).encode(), "img0.png": _png()},
    ]
    mixed = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4], bad[4], good[5]]
    shards = _write(tmp_path, "train", mixed)
    _write(tmp_path / "empty", "train", [])
    import tarfile
    with tarfile.open(tmp_path / "train-999999.tar", "w"):
        pass  # an empty shard
    return shards + [str(tmp_path / "train-999999.tar")]


def test_bad_input_is_counted_and_no_good_sample_is_lost(tmp_path, tok, caplog):
    shards = _bad_shards(tmp_path)
    ds = ShardStream(shards, SampleProcessor(ChatTemplate("helium", tok), max_pixels=56 * 56),
                     dict(max_text_tokens=256, max_image_tokens=64), shuffle=False, repeat=False)
    rows = list(ds.batches())
    keys = [m["key"] for r in rows for m in r.meta]
    assert sorted(keys) == [f"good{i}" for i in range(6)]
    st = ds.stats()
    for reason in ("corrupt_image", "malformed_json", "missing_image", "empty_answer", "oversize", "empty_shard"):
        assert st.get(reason) == 1, (reason, st)
    assert "corrupt" in caplog.text and "badjson" in caplog.text


def test_missing_shards_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shards(str(tmp_path / "nope-*.tar"))
    with pytest.raises(ValueError, match="empty shard pattern"):
        expand_shards("")
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        ImageDataModule(train=str(tmp_path))  # a directory without train-*.tar


@pytest.mark.parametrize("num_shards", [1, 5])
def test_every_sample_read_once_across_ranks_and_workers(tmp_path, tok, num_shards):
    samples = [make_sample(f"s{i:03d}", _conv(answer=str(i)), {"img0.png": _png()}) for i in range(23)]
    shards = _write(tmp_path, "train", samples, max_count=-(-23 // num_shards))
    assert len(shards) == num_shards
    ds = ShardStream(shards, SampleProcessor(ChatTemplate("helium", tok)), {}, shuffle=True, repeat=False, seed=3)
    seen = []
    for slot in range(4):  # 2 ranks x 2 workers
        seen += [raw["__key__"] for raw in ds._raw_samples(0, slot, 4)]
    assert sorted(seen) == sorted(f"s{i:03d}" for i in range(23))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_at_the_same_data_position(tmp_path, workers):
    samples = [make_sample(f"s{i:03d}", _conv(answer=f"answer {i}"), {"img0.png": _png()}) for i in range(40)]
    _write(tmp_path, "train", samples, max_count=10)
    kw = dict(train=str(tmp_path), max_text_tokens=96, max_image_tokens=64, max_pixels=56 * 56, num_workers=workers,
              seed=5, shuffle_buffer=8)
    ref = [b.input_ids.tolist() for b in itertools.islice(iter(ImageDataModule(**kw).train_dataloader()), 12)]
    dm = ImageDataModule(**kw)
    dm.load_state_dict({"batches_consumed": 7, "seed": 5})
    resumed = [b.input_ids.tolist() for b in itertools.islice(iter(dm.train_dataloader()), 5)]
    assert resumed == ref[7:12]


def test_packer_fill_and_oversize():
    def s(n, img=0):
        return Sample([1] * n, [False] * n, [0] if img else [], [torch.zeros(4 * img, 1176)] if img else [],
                      [[1, 2, 2 * img]] if img else [], {"key": str(n)})
    p = Packer(max_text_tokens=100, max_image_tokens=8, buffer_size=8)
    rows = list(p.pack([s(60), s(50), s(40), s(30, 1), s(20), s(150), s(10, 2)]))
    assert p.stats.oversize == 1 and p.oversize_keys == ["150"]
    for r in rows:
        assert r.num_text_tokens <= 100 and r.num_image_tokens <= 8
    assert sum(r.num_samples for r in rows) == 6
