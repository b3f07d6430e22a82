"""Bounded memory for video (issue 26 item 4): frames are downscaled as they are decoded and
a read keeps at most a capped number of them. A 1080p 60 s clip converted to a shard: peak RSS
growth ~50 MB (the old path kept its 120 sampled frames as full-size RGB: 918 MB measured)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from casa.processing.video import TooManyFrames, fit_pixels, open_video, read_video
from data.converters import main, video_frames
from data.dataset import VideoOptions
from tests.data_fixtures import encode_clip

BOUND_MB = 150
"""Peak RSS growth allowed while converting the 1080p 60 s clip (120 frames kept at 448^2):
the decoder's own frames (FFmpeg's automatic threads are capped at 16, ~3 MB of YUV each)
plus one small RGB frame and the JPEGs (docs/reliability.md)."""


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


@pytest.fixture(scope="module")
def clip_1080p(tmp_path_factory) -> Path:
    """60 s of black 1920x1080 h264 at 2 fps (120 frames, ~11 KB): small on disk, big decoded."""
    import av

    path = tmp_path_factory.mktemp("video") / "black1080.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=2)
        s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
        s.options = {"preset": "ultrafast"}
        black = av.VideoFrame(1920, 1080, "yuv420p")
        for k, plane in enumerate(black.planes):  # Y = 0, U = V = 128: black
            plane.update(bytes([0 if k == 0 else 128]) * plane.buffer_size)
        for i in range(120):
            black.pts, black.time_base = i, Fraction(1, 2)
            out.mux(s.encode(black))
        out.mux(s.encode())
    return path


def test_a_1080p_minute_converts_within_the_bound(clip_1080p):
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS counter here: {e}")
    before = _status_mb("VmRSS")
    files, fields, times, _ = video_frames(clip_1080p, VideoOptions())
    grown = _status_mb("VmHWM") - before
    assert grown < BOUND_MB, f"converting grew peak RSS by {grown:.0f} MB (bound {BOUND_MB} MB)"
    assert len(times) == 120 and times[-1] == pytest.approx(59.5)


def test_frames_are_downscaled_as_decoded_to_the_converters_size(tmp_path):
    path = encode_clip(tmp_path / "c.mp4", [i / 10 for i in range(20)], size=(320, 180))
    frames = read_video(path, max_pixels=112 * 112)
    assert {f.image.size for f in frames} == {fit_pixels(320, 180, 112 * 112)} == {(149, 84)}  # aspect kept, <= cap
    full = read_video(path)
    assert {f.image.size for f in full} == {(320, 180)}  # no cap: the stored size, as before
    assert [f.t for f in frames] == [f.t for f in full]


def test_the_frame_cap_refuses_a_read_that_would_keep_too_many(tmp_path):
    path = encode_clip(tmp_path / "c.mp4", [i / 10 for i in range(40)], size=(32, 32))  # 4 s: 20 frames
    with pytest.raises(TooManyFrames, match="keeps 20 frames, above the cap of 8"):
        read_video(path, max_frames=8)
    with open_video(path) as reader:
        assert len(reader.sample_indices(max_frames=20)) == 20
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "c.mp4").write_bytes(path.read_bytes())
    (tmp_path / "qa.json").write_text('[{"id": "c", "video": "c.mp4", "conversations": [{"from": "human", '
                                      '"value": "<video>"}, {"from": "gpt", "value": "a"}]}]')
    s = main(["videos", "--json", str(tmp_path / "qa.json"), "--videos", str(tmp_path / "v"), "--out",
              str(tmp_path / "o"), "--max-frames", "8"])
    assert s.written == 0 and dict(s.skipped) == {"too_many_frames": 1}
