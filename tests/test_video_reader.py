"""The video reader (`casa.processing.video`) on clips the tests encode themselves with PyAV:
h264 mp4 and vp9 webm at 25/30 fps and at a variable rate, rotation metadata, odd sizes, a
truncated file, a file without a video stream. Every frame shows its index as stripes
(`tests.data_fixtures.counter_frame`); the frames read back must be the ones the paper's
2 fps rule picks from the container's timestamps."""

from __future__ import annotations

import random

import pytest

from casa.processing.video import FrameFolder, VideoError, open_video, pick_at_rate, read_video, sample_frames
from tests.data_fixtures import encode_audio_only, encode_clip, read_counter


def vfr_times(n: int, seed: int = 0) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(round(t, 3))
        t += rng.choice([0.021, 0.037, 0.1, 0.253])
    return out


CLIPS = {  # name -> (codec, suffix, timestamps)
    "h264_25fps": ("libx264", "mp4", [i / 25 for i in range(100)]),     # 4 s
    "h264_30fps": ("libx264", "mp4", [i / 30 for i in range(330)]),     # 11 s: the 2 fps branch
    "vp9_25fps": ("libvpx-vp9", "webm", [i / 25 for i in range(60)]),
    "vp9_30fps": ("libvpx-vp9", "webm", [i / 30 for i in range(90)]),
    "h264_vfr": ("libx264", "mp4", vfr_times(120)),
    "vp9_vfr": ("libvpx-vp9", "webm", vfr_times(80, seed=1)),
}


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_sampled_frames_are_the_ones_picked_by_timestamp(tmp_path, name):
    codec, suffix, times = CLIPS[name]
    path = encode_clip(tmp_path / f"{name}.{suffix}", times, codec)
    with open_video(path) as reader:
        stored = reader.timestamps()
        frames = reader.sample(fps=2.0)
    assert stored == pytest.approx(times, abs=1e-3)  # the container's pts, not index / nominal fps
    expected = sample_frames(stored, 2.0)
    assert [read_counter(f.image) for f in frames] == [i % 256 for i in expected]
    assert [f.t for f in frames] == pytest.approx([times[i] for i in expected], abs=1e-3)
    assert frames[0].image.size == (64, 64)


def test_seeking_decodes_fewer_frames_than_the_clip_holds(tmp_path):
    """A 2 fps read of a 30 fps clip with a keyframe every 12 frames seeks past most of it."""
    times = [i / 30 for i in range(330)]
    path = encode_clip(tmp_path / "c.mp4", times, gop=12)
    reader = open_video(path)
    decoded = []

    class Counting:  # the container, counting the frames its decoder gives
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *a, **k):
            for f in self.container.decode(*a, **k):
                decoded.append(f.pts)
                yield f

    reader.container = Counting(reader.container)
    frames = reader.sample(fps=2.0, max_duration=180.0)
    assert [read_counter(f.image) for f in frames] == [i % 256 for i in sample_frames(reader.timestamps(), 2.0)]
    assert len(decoded) < len(times) // 2, f"decoded {len(decoded)} of {len(times)} frames"


def test_a_time_range_and_the_short_clip_rule(tmp_path):
    times = [i / 25 for i in range(250)]  # 10 s
    path = encode_clip(tmp_path / "c.mp4", times)
    part = read_video(path, start=2.0, end=5.0)  # 3 s < min_duration: 20 uniform frames of the range
    expected = [100 // 2 + i for i in sample_frames(times[50:126])]
    assert len(part) == 20 and [read_counter(f.image) for f in part] == expected
    assert part[0].t == pytest.approx(2.0) and part[-1].t == pytest.approx(5.0)


def test_rotation_metadata_and_odd_sizes(tmp_path):
    import numpy as np

    def marked(i, size):  # a white block in the stored top-left corner
        w, h = size
        a = np.zeros((h, w, 3), np.uint8)
        a[: h // 4, : w // 4] = 255
        return a

    path = encode_clip(tmp_path / "r.mp4", [i / 25 for i in range(10)], size=(64, 48), rotation=90, frame=marked)
    img = read_video(path)[0].image
    # a 90 degree counter-clockwise display rotation: upright is 48 wide, the corner at the bottom left
    assert img.size == (48, 64)
    a = np.asarray(img.convert("L"))
    assert a[-8:, :6].mean() > 200 and a[:8, :6].mean() < 50 and a[-8:, -6:].mean() < 50
    odd = encode_clip(tmp_path / "odd.webm", [i / 25 for i in range(30)], "libvpx-vp9", size=(67, 45))
    frames = read_video(odd)
    assert frames[0].image.size == (67, 45) and len(frames) == 20


def test_broken_inputs_raise_one_line_video_errors(tmp_path):
    good = encode_clip(tmp_path / "c.mp4", [i / 25 for i in range(50)])
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov atom (at the end) gone
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    encode_audio_only(tmp_path / "audio.mp4")
    for name, match in (("cut.mp4", "cannot open as a video"), ("junk.mp4", "cannot open as a video"),
                        ("audio.mp4", "no video stream .streams: audio"), ("missing.mp4", "no such file")):
        with pytest.raises(VideoError, match=match) as e:
            read_video(tmp_path / name)
        assert "\n" not in str(e.value)


def test_a_truncated_webm_gives_its_first_frames_or_an_error(tmp_path):
    """webm has no index at the end: a cut file still demuxes up to the cut; the reader
    never returns a frame it could not decode."""
    times = [i / 25 for i in range(100)]
    data = encode_clip(tmp_path / "c.webm", times, "libvpx-vp9").read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    try:
        frames = read_video(tmp_path / "cut.webm")
    except VideoError as e:
        assert "\n" not in str(e)
        return
    ts = open_video(tmp_path / "cut.webm").timestamps()
    assert 0 < len(ts) < len(times)
    assert [read_counter(f.image) for f in frames] == sample_frames(ts)


def test_live_sampling_matches_the_training_rule_and_reads_a_pipe(tmp_path):
    times = vfr_times(150, seed=3)
    path = encode_clip(tmp_path / "v.mp4", times)
    assert list(pick_at_rate(iter(times), 2.0, time_of=float)) == [
        times[i] for i in sample_frames(times, 2.0, min_duration=0.0, max_duration=float("inf"))]
    with open_video(path) as reader:  # after the packet index, the live read starts over
        want = sample_frames(reader.timestamps(), 2.0, min_duration=0.0, max_duration=float("inf"))
        assert [read_counter(f.image) for f in reader.frames_at(2.0)] == want
    with open(path, "rb") as pipe:  # a file object read front to back, as a pipe or socket
        live = [read_counter(f.image) for f in open_video(pipe).frames_at(2.0)]
    assert live == want


def test_frame_folders_read_through_the_same_interface(tmp_path):
    from PIL import Image

    from tests.data_fixtures import counter_frame

    for i in range(30):
        Image.fromarray(counter_frame(i)).save(tmp_path / f"{i + 1:06d}.png")
    folder = open_video(tmp_path, fps=5.0)
    assert isinstance(folder, FrameFolder) and folder.timestamps()[:3] == [0.0, 0.2, 0.4]
    assert [read_counter(f.image) for f in folder.frames_at(2.0)] == sample_frames(
        folder.timestamps(), 2.0, min_duration=0.0, max_duration=float("inf"))
    assert [read_counter(f.image) for f in folder.sample(2.0)] == sample_frames(folder.timestamps())


def test_the_video_benchmark_reads_its_clips(tmp_path):
    from experiments.benchmarks.data import VIDEO_CLIPS, video_throughput

    rows = video_throughput(quick=True, tmp=tmp_path)
    assert [r["clip"] for r in rows] == list(VIDEO_CLIPS)
    for r in rows:  # 2 s at 30 fps, under min_duration: the 20 uniformly spread frames
        assert r["frames"] == 20 and r["frames_per_s"] > 0 and r["x_realtime"] > 0


def test_a_url_is_read_as_it_arrives(tmp_path):
    """An http source (a local server): PyAV streams it; the frames are the file's."""
    import functools
    import http.server
    import threading

    times = [i / 25 for i in range(75)]
    encode_clip(tmp_path / "clip.webm", times, "libvpx-vp9")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with open_video(f"http://127.0.0.1:{server.server_port}/clip.webm") as reader:
            live = [read_counter(f.image) for f in reader.frames_at(2.0)]
    finally:
        server.shutdown()
    assert live == sample_frames(times, 2.0, min_duration=0.0, max_duration=float("inf"))
