"""A clip's frames in one shard member (data.format.pack_frames) vs the older one member per
frame: both read to the same samples; batched patchify equals the per-image one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from casa.processing.image import ImageError, patchify, patchify_many
from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import resolve_tokenizer
from data.dataset import SampleProcessor, ShardStream, VideoOptions
from data.format import check_conversation, make_sample, pack_frames, unpack_frames
from tests.data_fixtures import jpeg_bytes, write


# ---------------------------------------------------------------------------------- patchify
@pytest.mark.parametrize("batch_pixels", [1 << 18, 2 * 56 * 56])  # one batch of the 56² frames, or pairs
def test_patchify_many_equals_patchify_image_by_image(batch_pixels, monkeypatch):
    """Same-size frames go through one tensor op, other sizes through their own: every
    output equals patchify of that image alone, bit for bit, in input order."""
    import casa.processing.image as image_module

    rng = np.random.default_rng(0)
    sizes = [(56, 56), (100, 70), (56, 56), (30, 200), (56, 56), (448, 300), (56, 56), (56, 56)]
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    imgs.append(Image.fromarray(rng.integers(0, 256, (60, 60), dtype=np.uint8), mode="L"))  # converted to RGB
    alone = [patchify(img, 112 * 112) for img in imgs]
    monkeypatch.setattr(image_module, "BATCH_PIXELS", batch_pixels)
    out = patchify_many(imgs, 112 * 112)
    assert len(out) == len(imgs)
    for (pv, grid), (one, one_grid) in zip(out, alone):
        assert grid == one_grid and pv.shape == one.shape and torch.equal(pv, one) and pv.is_contiguous()


def test_patchify_many_names_the_image_it_cannot_use():
    ok = Image.new("RGB", (56, 56))
    with pytest.raises(ImageError, match="aspect ratio") as e:
        patchify_many([ok, ok, Image.new("RGB", (5000, 10))], 112 * 112)
    assert e.value.index == 2


# ---------------------------------------------------------------------------------- format
def frames(n: int, size=(56, 56)) -> list[bytes]:
    return [jpeg_bytes(Image.new("RGB", size, (20 * i % 256, 100, 255 - 10 * i))) for i in range(n)]


def test_pack_frames_round_trips_and_rejects_bad_offsets():
    jpgs = frames(5)
    refs = [f"f{i:06d}" for i in range(5)]
    files, fields = pack_frames(refs, jpgs)
    assert list(files) == ["frames.mjpeg"] and fields["frame_offsets"][-1] == len(files["frames.mjpeg"])
    got = unpack_frames(fields, {"frames": files["frames.mjpeg"]})
    assert got == dict(zip(refs, jpgs))
    # each piece is a whole JPEG file (SOI ... EOI): the member is a plain Motion JPEG stream
    assert all(b[:2] == b"\xff\xd8" and b[-2:] == b"\xff\xd9" for b in got.values())
    check_conversation({"messages": [], "video": {**fields, "timestamps": [0.5 * i for i in range(5)],
                                                  "layout": "caption"}}, available={"frames"})
    for bad in ([0, 3], fields["frame_offsets"][:-1] + [10 ** 9], [0, 9, 5, 20, 30, fields["frame_offsets"][-1]]):
        with pytest.raises(ValueError, match="frame_offsets"):
            unpack_frames({**fields, "frame_offsets": bad}, {"frames": files["frames.mjpeg"]})
    with pytest.raises(KeyError):
        unpack_frames(fields, {})
    with pytest.raises(ValueError, match="no file"):
        check_conversation({"messages": [], "video": {**fields, "timestamps": [0.0] * 5, "layout": "caption"}},
                           available={"f000000"})
    with pytest.raises(ValueError, match="pack_frames"):
        pack_frames(refs, jpgs[:2])


# ---------------------------------------------------------------------------------- reading
def clip_samples(n_clips: int = 3) -> tuple[list[dict], list[dict]]:
    """The same caption and QA clips written in both layouts -> (packed samples, per-frame samples)."""
    packed, single = [], []
    for k in range(n_clips):
        n = 6 + k
        jpgs, refs, times = frames(n), [f"f{i:03d}" for i in range(n)], [0.5 * i for i in range(n)]
        if k % 2 == 0:
            v = {"timestamps": times, "layout": "caption", "captions": [{"t": times[2], "text": f"event {k}"}]}
            messages = []
        else:
            v = {"timestamps": times, "layout": "qa"}
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "left"}]}]
        files, fields = pack_frames(refs, jpgs)
        packed.append(make_sample(f"c{k}", {"messages": messages, "video": {**v, **fields}}, files))
        single.append(make_sample(f"c{k}", {"messages": messages, "video": {**v, "frames": refs}},
                                  {f"{r}.jpg": b for r, b in zip(refs, jpgs)}))
    return packed, single


@pytest.fixture(scope="module")
def template():
    return ChatTemplate("helium", resolve_tokenizer("char"))


def test_both_layouts_read_to_the_same_samples(tmp_path, template):
    """Old shards (one member per frame) still load, and give the packed layout's samples."""
    packed, single = clip_samples()
    assert [len(s) for s in packed] == [3, 3, 3] and [len(s) for s in single] == [8, 9, 10]  # key, json, members
    proc = SampleProcessor(template, 112 * 112, video=VideoOptions(min_duration=0.0, frame_max_pixels=56 * 56))
    got = {}
    for layout, samples in (("packed", packed), ("single", single)):
        urls = write(tmp_path / layout, "train", samples)  # through real tars, not just dicts
        ds = ShardStream(urls, proc, dict(max_text_tokens=512, max_image_tokens=1024), shuffle=False, repeat=False)
        got[layout] = list(ds.samples())
        assert [s.meta["key"] for s in got[layout]] == ["c0", "c1", "c2"] and ds.stats()["samples_kept"] == 3
    for x, y in zip(got["packed"], got["single"]):
        assert x.input_ids == y.input_ids and x.image_positions == y.image_positions and x.grids == y.grids
        assert len(x.pixel_values) == len(y.pixel_values) > 0
        assert all(torch.equal(p, q) for p, q in zip(x.pixel_values, y.pixel_values))


def test_bad_packed_frames_are_counted_skips(tmp_path, template):
    packed, _ = clip_samples(2)
    no_member = {k: v for k, v in packed[0].items() if k != "frames.mjpeg"}
    conv = json.loads(packed[1]["json"])
    conv["video"]["frame_offsets"][-1] += 7  # past the member's end
    bad_offsets = {**packed[1], "json": json.dumps(conv).encode()}
    urls = write(tmp_path, "train", [no_member, bad_offsets, packed[0]])
    proc = SampleProcessor(template, 112 * 112, video=VideoOptions(min_duration=0.0, frame_max_pixels=56 * 56))
    ds = ShardStream(urls, proc,
                     dict(max_text_tokens=512, max_image_tokens=1024), shuffle=False, repeat=False)
    assert [s.meta["key"] for s in ds.samples()] == ["c0"]
    stats = ds.stats()
    assert stats["missing_image"] == 1 and stats["malformed_json"] == 1


def test_converters_write_one_member_per_clip(tmp_path):
    from data.converters import main
    from tests.data_fixtures import encode_clip, read_tar

    vids = tmp_path / "v"
    vids.mkdir()
    encode_clip(vids / "a.mp4", [i / 10 for i in range(30)])
    qa = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "a counter"}]
    (tmp_path / "qa.json").write_text(json.dumps([{"id": "a", "video": "a.mp4", "conversations": qa}]))
    s = main(["videos", "--json", str(tmp_path / "qa.json"), "--videos", str(vids), "--out", str(tmp_path / "o"),
              "--min-duration", "0"])
    (files,) = read_tar(tmp_path / "o" / "train-000000.tar").values()
    v = json.loads(files["json"])["video"]
    assert s.written == 1 and sorted(files) == ["frames.mjpeg", "json"] and len(v["frames"]) == 6
    assert len(unpack_frames(v, {"frames": files["frames.mjpeg"]})) == 6


def test_evaluate_reads_caption_clips_of_both_layouts():
    """`experiments.evaluate`'s live-captioning pass takes a clip's frames from the raw sample."""
    from types import SimpleNamespace

    from experiments.evaluate import caption_clip

    packed, single = clip_samples(1)
    assistant = SimpleNamespace(settings=SimpleNamespace(fps=2.0, min_duration=0.0, min_frames=20, max_duration=180.0))
    got_packed, got_single = caption_clip(packed[0], assistant), caption_clip(single[0], assistant)
    assert got_packed == got_single and len(got_packed[0]) == 6 and got_packed[1][2] == "event 0"
