"""Live captioning of real encoded video (`experiments.stream --video clip.mp4`), `--out`
captioned videos, and the subtitle drawing they use. The checkpoint is test_inference's
two-step tiny CASA⊕ (its `run` fixture)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from casa.processing.video import open_video, read_video, sample_frames
from data.video import caption_at, draw_caption, write_captioned
from tests.data_fixtures import encode_clip, read_counter
from tests.test_inference import run  # noqa: F401  (the module fixture: a tiny trained checkpoint)


def band(img: Image.Image) -> float:
    """Mean brightness of the bottom sixth (where subtitles go) minus the grey it holds unlabelled."""
    a = np.asarray(img.convert("L"), dtype=np.float32)
    return float(a[-a.shape[0] // 6:].mean())


def test_write_captioned_draws_each_cue_at_its_time_on_every_frame(tmp_path):
    times = [i / 25 for i in range(75)]  # 3 s
    src = encode_clip(tmp_path / "in.mp4", times, size=(96, 64))
    cues = [(1.0, 2.0, "the stripes count up")]
    info = write_captioned(src, tmp_path / "out.mp4", cues)
    assert info["frames"] == 75 and info["duration_s"] == pytest.approx(times[-1], abs=1e-3)
    with open_video(tmp_path / "out.mp4") as out:
        ts = out.timestamps()
        frames = out.read(list(range(len(ts))))
    assert len(frames) == 75 and ts == pytest.approx(times, abs=1e-3)  # playable, same frames, same clock
    assert [read_counter(f.image) for f in frames] == list(range(75))  # the top half is untouched
    grey = band(frames[0].image)
    for f in frames:
        shown = caption_at(cues, f.t)
        assert (abs(band(f.image) - grey) > 10) == bool(shown), f.t
    assert caption_at(cues, 0.99) == "" and caption_at(cues, 1.0) == cues[0][2] and caption_at(cues, 2.0) == ""
    assert draw_caption(frames[0].image, "  ") is frames[0].image


def stream(argv: list[str], capsys) -> dict:
    from experiments.stream import main

    assert main([*argv, "--no-wait", "--json", "--max-new-tokens", "3", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out)


def test_stream_over_an_mp4_equals_the_frame_folder_and_writes_a_captioned_copy(run, tmp_path, capsys,  # noqa: F811
                                                                                monkeypatch):
    times = [i / 30 for i in range(100)]  # 3.3 s at 30 fps: the 2 fps ticks fall on frames
    clip = encode_clip(tmp_path / "clip.mp4", times)
    folder = tmp_path / "frames"
    folder.mkdir()
    picked = list(open_video(clip).frames_at(2.0))
    for i, f in enumerate(picked):
        f.image.save(folder / f"{i:06d}.png")  # lossless: the same pixels the stream decodes
    assert [read_counter(f.image) for f in picked] == sample_frames(times, 2.0, 0.0, 1, float("inf"))
    ckpt = ["--ckpt", str(run["casa"])]
    over_mp4 = stream([*ckpt, "--video", str(clip), "--srt", str(tmp_path / "a.srt"), "--out",
                       str(tmp_path / "captioned.mp4")], capsys)
    over_folder = stream([*ckpt, "--video", str(folder), "--srt", str(tmp_path / "b.srt")], capsys)
    said = [(r["t"], r["text"]) for r in over_mp4["frames"]]
    assert said == [(r["t"], r["text"]) for r in over_folder["frames"]] and len(said) == 7
    assert (tmp_path / "a.srt").read_text() == (tmp_path / "b.srt").read_text()
    out = over_mp4["summary"]["out"]
    assert out["frames"] == 100 and out["duration_s"] == pytest.approx(times[-1], abs=1e-3)
    with open_video(tmp_path / "captioned.mp4") as captioned:  # a playable mp4: every frame, on the clip's clock
        assert captioned.timestamps() == pytest.approx(times, abs=1e-3)
    assert len(read_video(tmp_path / "captioned.mp4", min_duration=0.0)) == 7
    # the same bytes through a pipe (stdin), read as they arrive
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(open(clip, "rb")))
    piped = stream([*ckpt, "--video", "-", "--srt", str(tmp_path / "c.srt")], capsys)
    assert [(r["t"], r["text"]) for r in piped["frames"]] == said


def test_stream_pacing_follows_the_video_clock(run, tmp_path, capsys):  # noqa: F811
    """Waiting for frames: a VFR clip's frames arrive at their own times, not index / fps."""
    import time

    times = [0.0, 0.1, 0.2, 0.9, 1.0, 1.45, 1.5]
    clip = encode_clip(tmp_path / "vfr.mp4", times)
    from experiments.stream import main

    start = time.perf_counter()
    assert main(["--ckpt", str(run["casa"]), "--video", str(clip), "--json", "--max-new-tokens", "2",
                 "--threads", "1", "--srt", str(tmp_path / "v.srt")]) == 0
    elapsed = time.perf_counter() - start
    frames = json.loads(capsys.readouterr().out)["frames"]
    # ticks 0, 0.5, 1, 1.5 -> the nearest frames: 0.2 is nearer 0.5 than 0.9 is
    assert [f["t"] for f in frames] == pytest.approx([0.0, 0.2, 1.0, 1.5], abs=1e-3)
    assert elapsed >= 1.5 and all(f["delay_s"] < 1.0 for f in frames)  # paced to the clip's clock


def test_out_needs_a_video_source(run, capsys):  # noqa: F811
    from experiments.stream import main

    with pytest.raises(SystemExit):
        main(["--ckpt", str(run["casa"]), "--video", "synthetic", "--out", "x.mp4"])
    assert "--out re-reads the input video" in capsys.readouterr().err


def test_chat_reads_a_video_file_sampled_as_in_training(run, tmp_path):  # noqa: F811
    from casa.assistant import InputError, load

    assistant = load(str(run["casa"]))
    clip = encode_clip(tmp_path / "q.webm", [i / 25 for i in range(150)], "libvpx-vp9")  # 6 s: 20 frames
    s = assistant.settings
    # frames downscaled as decoded to the frame cap, as chat reads a file (a 1080p clip never
    # holds its frames at full size)
    frames = [f.image for f in read_video(clip, s.fps, s.min_duration, s.min_frames, s.max_duration,
                                          max_pixels=min(s.max_pixels, s.frame_max_pixels))]
    question = {"type": "text", "text": "Which way?"}
    by_path = assistant.prompt([{"role": "user", "content": [{"type": "video", "video": str(clip)}, question]}])
    by_frames = assistant.prompt([{"role": "user", "content": [{"type": "video", "frames": frames}, question]}])
    assert by_path.input_ids.tolist() == by_frames.input_ids.tolist() and len(frames) == 20
    assert torch.equal(by_path.pixel_values, by_frames.pixel_values)
    with pytest.raises(InputError, match="no such file"):
        assistant.prompt([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "nope.mp4")}]}])


def test_unreadable_videos_are_one_line_errors(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    from experiments.stream import main
    from tests.data_fixtures import encode_audio_only

    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    data = encode_clip(tmp_path / "c.mp4", [i / 25 for i in range(50)]).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    encode_audio_only(tmp_path / "speech.m4a")  # a suffix the reader does not list: tried as an image, then a video
    for name, needle in (("cut.mp4", "cannot open as a video"), ("speech.m4a", "no video stream (streams: audio)")):
        assert main(["--ckpt", str(run["casa"]), "--video", str(tmp_path / name), "--no-wait"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("error:") == 1, err


def test_generation_flags_reach_the_stream(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    """--repetition-penalty changes what the two-step model repeats at every frame; a seeded
    sampled stream is reproducible; a bad value is one line naming the field, exit 2."""
    from experiments.stream import main

    clip = encode_clip(tmp_path / "c.mp4", [i / 25 for i in range(50)])  # 2 s: 4 frames
    ckpt = ["--ckpt", str(run["casa"]), "--video", str(clip), "--srt", str(tmp_path / "c.srt")]
    said = lambda out: [r["text"] for r in out["frames"]]  # noqa: E731
    greedy = said(stream(ckpt, capsys))
    assert len(greedy) == 4 and said(stream([*ckpt, "--repetition-penalty", "3"], capsys)) != greedy
    sampled = [said(stream([*ckpt, "--temperature", "1.5", "--sampling-seed", "5"], capsys)) for _ in range(2)]
    assert sampled[0] == sampled[1] != greedy
    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    assert main([*ckpt, "--top-p", "0", "--no-wait"]) == 2
    err = capsys.readouterr().err
    assert "GenerationConfig.top_p=0.0 must be in (0, 1]" in err and "Traceback" not in err
