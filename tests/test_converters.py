"""Dataset converters on tiny hand-made inputs: LLaVA JSON, frame folders, LiveCC transcripts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data.converters import captions_from_transcript, convert_llava, convert_videos, main
from data.format import check_conversation
from tests.data_fixtures import read_tar


def read_all(summary) -> dict[str, dict[str, bytes]]:
    out = {}
    for shard in summary.shards:
        out.update(read_tar(Path(shard)))
    for key, files in out.items():
        check_conversation(json.loads(files["json"]), available={f.split(".")[0] for f in files if f != "json"})
    return out


def save_image(path: Path, color=(200, 30, 30), fmt="JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path, format=fmt)
    return path.read_bytes()


# ---------------------------------------------------------------------------------- llava
@pytest.fixture
def llava(tmp_path):
    imgs = tmp_path / "images"
    a = save_image(imgs / "coco" / "a.jpg")
    b = save_image(imgs / "b.png", fmt="PNG")
    (imgs / "broken.jpg").write_bytes(b"not an image")
    records = [
        {"id": "a.1", "image": "coco/a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "two", "image": ["coco/a.jpg", "b.png"], "conversations": [
            {"from": "human", "value": "Left <image> right <image>\nSame?"}, {"from": "gpt", "value": "no"}]},
        {"id": "untagged", "image": "b.png", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "a square"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "nope.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "broken", "image": "broken.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "mismatch", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "A"}]},
        {"id": "badrole", "image": "b.png", "conversations": [
            {"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "A"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path, {"a": a, "b": b}


def test_llava_converts_and_counts_skips(llava):
    root, raw = llava
    s = convert_llava(root / "data.json", root / "images", root / "out", shard_size=2, progress=False)
    assert s.written == 4
    assert dict(s.skipped) == {"missing_image": 1, "corrupt_image": 1, "image_tag_mismatch": 1, "bad_turn": 1}
    samples = read_all(s)
    assert len(s.shards) == 2 and len(samples) == 4
    by_id = {json.loads(f["json"])["source_id"]: (json.loads(f["json"]), f) for f in samples.values()}
    conv, files = by_id["a.1"]
    assert conv["messages"][0]["content"] == [{"type": "image", "ref": "img0"}, {"type": "text", "text": "What colour is it?"}]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    assert files["img0.jpg"] == raw["a"]  # original bytes, no re-encoding
    assert conv["task"] == "llava" and conv["group"] == "general"
    conv, files = by_id["two"]
    assert [c.get("ref", c.get("text")) for c in conv["messages"][0]["content"]] == ["Left ", "img0", " right ", "img1", "Same?"]
    assert files["img0.jpg"] == raw["a"] and files["img1.png"] == raw["b"]
    conv, _ = by_id["untagged"]
    assert conv["messages"][0]["content"][0] == {"type": "image", "ref": "img0"}
    conv, files = by_id["text-only"]
    assert set(files) == {"json"}
    assert all("." not in k for k in samples)  # the id's dot would split webdataset fields


def test_llava_cli_prints_summary(llava, capsys):
    root, _ = llava
    s = main(["llava", "--json", str(root / "data.json"), "--images", str(root / "images"), "--out", str(root / "o"),
              "--prefix", "val", "--task", "vqa", "--group", "coarse"])
    out = capsys.readouterr().out
    assert "written" in out and "missing_image" in out
    assert all(Path(p).name.startswith("val-") for p in s.shards)
    assert {json.loads(f["json"])["group"] for f in read_all(s).values()} == {"coarse"}


# ---------------------------------------------------------------------------------- videos
def make_video(root: Path, name: str, n: int, meta: dict | None = None, transcript: list | None = None) -> None:
    for i in range(n):  # names sort wrongly as strings past 9 on purpose: order must be numeric
        save_image(root / name / f"{i + 1}.jpg", color=(10 * i, 0, 0))
    if meta is not None:
        (root / name / "meta.json").write_text(json.dumps(meta))
    if transcript is not None:
        (root / name / "transcript.json").write_text(json.dumps(transcript))


def frame_order(files: dict[str, bytes], refs: list[str]) -> list[int]:
    """The index each frame encodes in its red channel (10 * i), in `refs` order."""
    by_ref = {k.split(".")[0]: v for k, v in files.items()}
    return [round(Image.open(io.BytesIO(by_ref[r])).getpixel((5, 5))[0] / 10) for r in refs]


def test_frames_folders_to_qa_video_samples(tmp_path):
    vids = tmp_path / "videos"
    make_video(vids, "v1", 12, meta={"fps": 4, "qa": [{"question": "What moves?", "answer": "a ball"},
                                                     {"question": "Where?", "answer": "left"}]})
    make_video(vids, "v2", 3)  # no meta -> no QA
    (vids / "v3").mkdir()  # no frames
    (vids / "clip.mp4").write_bytes(b"\x00")
    s = convert_videos("frames", vids, tmp_path / "out", progress=False)
    assert s.written == 1 and dict(s.skipped) == {"no_qa": 1, "no_frames": 1, "video_file_not_decoded": 1}
    (files,) = read_all(s).values()
    conv = json.loads(files["json"])
    v = conv["video"]
    assert v["layout"] == "qa" and v["timestamps"] == [i / 4 for i in range(12)]
    assert frame_order(files, v["frames"]) == list(range(12))
    assert conv["messages"][0]["content"] == [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    assert [m["content"][-1]["text"] for m in conv["messages"]] == ["What moves?", "a ball", "Where?", "left"]


def test_only_video_files_fail_with_the_decoder_message(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="decod"):
        convert_videos("frames", tmp_path / "v", tmp_path / "out", progress=False)
    with pytest.raises(SystemExit):
        main(["frames", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "out")])
    assert "ffmpeg" in capsys.readouterr().err


def test_livecc_transcripts_become_frame_aligned_captions(tmp_path):
    vids = tmp_path / "videos"
    transcript = [{"start": 0.2, "end": 1.2, "text": "a ball rolls"}, {"start": 2.6, "end": 2.9, "text": "stop"},
                  {"start": 9.0, "end": 9.5, "text": "after the end"}]
    make_video(vids, "v1", 8, transcript=transcript)   # 8 frames at 2 fps: t = 0 .. 3.5, clip ends at 4.0
    make_video(vids, "v2", 2)                           # no transcript
    make_video(vids, "v3", 2, transcript=[{"start": 5.0, "end": 6.0, "text": "too late"}])
    s = convert_videos("livecc", vids, tmp_path / "out", progress=False)
    assert s.written == 1 and dict(s.skipped) == {"missing_transcript": 1, "empty_transcript": 1}
    (files,) = read_all(s).values()
    conv = json.loads(files["json"])
    assert conv["messages"] == [] and conv["task"] == "live_caption" and conv["video"]["layout"] == "caption"
    # words at 0.2, 0.533, 0.867 (frames 0, 1, 1) and 2.6 (frame 5); 9.0 is after the clip
    assert conv["video"]["captions"] == [{"t": 0.0, "text": "a"}, {"t": 0.5, "text": "ball rolls"},
                                         {"t": 2.5, "text": "stop"}]


def test_captions_alignment_modes_against_hand_computation():
    times = [0.0, 1.0, 2.0]
    segs = [{"start": 0.5, "end": 2.5, "text": "one two three four"}]
    assert captions_from_transcript(segs, times, "start") == [{"t": 0.0, "text": "one two three four"}]
    # words at 0.5, 1.0, 1.5, 2.0 -> frames 0, 1, 1, 2
    assert captions_from_transcript(segs, times, "words") == [{"t": 0.0, "text": "one"}, {"t": 1.0, "text": "two three"},
                                                              {"t": 2.0, "text": "four"}]
    with pytest.raises(ValueError, match="start"):
        captions_from_transcript(segs, times, "middle")


def test_livecc_separate_transcript_folder_and_cli(tmp_path, capsys):
    vids, tr = tmp_path / "videos", tmp_path / "tr"
    make_video(vids, "clip", 4)
    tr.mkdir()
    (tr / "clip.json").write_text(json.dumps([{"start": 1.0, "end": 1.4, "text": "it bounces"}]))
    s = main(["livecc", "--videos", str(vids), "--transcripts", str(tr), "--out", str(tmp_path / "o"), "--align", "start"])
    assert "written" in capsys.readouterr().out
    (files,) = read_all(s).values()
    assert json.loads(files["json"])["video"]["captions"] == [{"t": 1.0, "text": "it bounces"}]
