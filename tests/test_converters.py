"""Dataset converters on tiny hand-made inputs: LLaVA JSON, frame folders, LiveCC transcripts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data.converters import captions_from_transcript, convert_llava, convert_videos, main
from data.converters import captions_from_words
from data.format import check_conversation
from data.video import sample_frames
from tests.data_fixtures import encode_audio_only, encode_clip, read_counter, read_tar


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


def test_only_video_files_in_the_folder_form_point_to_the_file_forms(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="videos --json"):
        convert_videos("frames", tmp_path / "v", tmp_path / "out", progress=False)
    with pytest.raises(SystemExit):
        main(["frames", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "out")])
    assert "livecc --jsonl" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------------- video files
def test_llava_video_qa_over_video_files_counts_broken_ones(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    times = [i / 25 for i in range(300)]  # 12 s at 25 fps -> 2 fps: 23 frames
    encode_clip(vids / "a.mp4", times, size=(96, 64))
    data = (vids / "a.mp4").read_bytes()
    (vids / "cut.mp4").write_bytes(data[: len(data) // 3])
    encode_audio_only(vids / "audio.mp4")
    qa = [{"from": "human", "value": "<image>\nWhat moves?"}, {"from": "gpt", "value": "stripes"}]
    records = [{"id": "a", "video": "a.mp4", "conversations": qa},
               {"id": "cut", "video": "cut.mp4", "conversations": qa},
               {"id": "audio", "video": "audio.mp4", "conversations": qa},
               {"id": "gone", "video": "nope.mp4", "conversations": qa},
               {"id": "noanswer", "video": "a.mp4", "conversations": qa[:1]}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    s = main(["videos", "--json", str(tmp_path / "qa.jsonl"), "--videos", str(vids), "--out", str(tmp_path / "out"),
              "--max-pixels", str(48 * 32)])
    assert s.written == 1 and dict(s.skipped) == {"bad_video": 2, "missing_video": 1, "no_answer": 1,
                                                  "malformed_record": 1}
    (files,) = read_all(s).values()
    conv = json.loads(files["json"])
    v = conv["video"]
    expected = sample_frames(times)
    assert v["layout"] == "qa" and v["timestamps"] == pytest.approx([times[i] for i in expected], abs=1e-3)
    by_ref = {k.split(".")[0]: Image.open(io.BytesIO(b)) for k, b in files.items() if k != "json"}
    assert [read_counter(by_ref[r]) for r in v["frames"]] == [i % 256 for i in expected]
    assert by_ref[v["frames"][0]].size == (48, 32)  # downscaled to --max-pixels, aspect kept
    assert conv["messages"][0]["content"] == [{"type": "video"}, {"type": "text", "text": "What moves?"}]


def test_captions_from_words_follow_livecc_said_by_the_frame():
    times = [0.0, 0.5, 1.0, 1.5]
    words = [[0.0, 0.2, "a"], [0.3, 0.5, "ball"], [0.6, 0.9, "rolls"], [1.2, 1.9, "late"], [9.0, 9.5, "gone"]]
    #   frame 0.0: "a" (not yet ended at 0.0 -> after frame 0.5)   said by 0.5: a ball   by 1.0: rolls
    assert captions_from_words(words, times) == [{"t": 0.5, "text": "a ball"}, {"t": 1.0, "text": "rolls"}]
    assert captions_from_words([[10.1, 10.5, "x"]], times, offset=10.0) == [{"t": 0.5, "text": "x"}]


def test_livecc_jsonl_over_video_files(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    times = [i / 30 for i in range(600)]  # 20 s at 30 fps
    encode_clip(vids / "game.mp4", times)

    def record(start, end, stream, video="game.mp4"):
        return [{"role": "user", "content": [{"type": "video", "video": video, "video_start": start, "video_end": end},
                                              {"type": "text", "text": "Commentate."}]},
                {"role": "assistant", "content": [{"type": "text_stream", "text_stream": stream}]}]

    stream = [[4.1, 4.4, "kick"], [4.5, 5.2, "off"], [12.0, 12.3, "goal"], [19.0, 19.2, "after"]]
    lines = [record(4.0, 16.0, stream), record(0, 3, [[0.1, 0.2, "x"]], video="missing.mp4"),
             record(4.0, 16.0, [[1.0, 2.0]]), record(4.0, 16.0, [[19.0, 19.2, "after"]])]
    with open(tmp_path / "live.jsonl", "w") as f:
        for r in lines:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps([0, 311, 622, 933]) + "\n")  # LiveCC's seek-offset line
    s = main(["livecc", "--jsonl", str(tmp_path / "live.jsonl"), "--videos", str(vids), "--out", str(tmp_path / "o")])
    assert s.written == 1 and dict(s.skipped) == {"missing_video": 1, "malformed_transcript": 1, "empty_transcript": 1}
    (files,) = read_all(s).values()
    conv = json.loads(files["json"])
    v = conv["video"]
    kept = [i for i, t in enumerate(times) if 4.0 - 1e-6 <= t <= 16.0 + 1e-6]
    expected = [kept[0] + i for i in sample_frames([times[i] for i in kept])]
    by_ref = {k.split(".")[0]: Image.open(io.BytesIO(b)) for k, b in files.items() if k != "json"}
    assert [read_counter(by_ref[r]) for r in v["frames"]] == [i % 256 for i in expected]
    assert v["timestamps"][0] == 0.0 and v["timestamps"][-1] == pytest.approx(12.0, abs=1e-3)
    # words on the video's clock, frames from 4.0 s: "kick" ends 4.4 -> the frame at 4.5 (0.5 in the clip)
    assert v["captions"] == [{"t": 0.5, "text": "kick"}, {"t": 1.5, "text": "off"}, {"t": 8.5, "text": "goal"}]
    assert v["prompt"] == "Commentate." and v["layout"] == "caption"


def test_demo_videos_round_trip_through_the_published_formats(tmp_path):
    """Synthetic clips -> mp4 + LiveCC / LLaVA-Video records (data.video_demo) -> converters:
    the shards hold the synthetic task's own captions at its own frame times, and its QA."""
    import random

    from data.synth_tasks.video import direction, live_caption
    from data.video_demo import write_demo

    assert write_demo(tmp_path / "d", clips=4, val=0, size=56) == {
        "livecc.jsonl": 2, "videos.jsonl": 2, "val-livecc.jsonl": 0, "val-videos.jsonl": 0}
    d = tmp_path / "d"
    # QA first: the captions' summary must not count the train-qa shards as its own (train-*)
    qa = main(["videos", "--json", str(d / "videos.jsonl"), "--videos", str(d / "videos"), "--out",
               str(tmp_path / "s"), "--prefix", "train-qa", "--min-duration", "0"])
    live = main(["livecc", "--jsonl", str(d / "livecc.jsonl"), "--videos", str(d / "videos"), "--out",
                 str(tmp_path / "s"), "--min-duration", "0"])
    assert [Path(p).name for p in live.shards] == ["train-000000.tar"]
    assert live.written == 2 and qa.written == 2 and not live.skipped and not qa.skipped
    for k, files in enumerate(read_all(live).values()):
        want, _ = live_caption(random.Random(f"video-demo/0/{2 * k}"), 56)
        v = json.loads(files["json"])["video"]
        assert v["timestamps"] == pytest.approx(want["video"]["timestamps"], abs=1e-3)
        assert v["captions"] == want["video"]["captions"]
    for k, files in enumerate(read_all(qa).values()):
        want, _ = direction(random.Random(f"video-demo/0/{2 * k + 1}"), 56)
        got = json.loads(files["json"])
        assert got["messages"] == want["messages"] and len(got["video"]["frames"]) == len(want["video"]["frames"])
