"""The one video reader: frames of a video file, a URL, a pipe or a folder of frames, with
their timestamps, sampled by the paper's rules.

    reader = open_video("clip.mp4")          # or a URL, "-" (stdin), or a frame folder
    frames = reader.sample(fps=2.0)          # [Frame(image, t)]: the training sampling
    for frame in reader.frames_at(2.0): ...  # live: decoded as the bytes arrive

Timestamps are the container's (pts * time_base, seconds), never a frame index divided by
a nominal rate, so variable-frame-rate files sample the frames shown at the wanted times.
`sample` reads the packet index (demuxing, no decoding), picks the wanted frames with
`sample_frames`, then seeks to the keyframe before each wanted frame whenever that skips
decoding (a keyframe lies after the last decoded frame); otherwise it decodes forward.
Frames come out upright (the display-matrix rotation is applied) at their stored size
(odd sizes included), or, with `max_pixels`, downscaled as each is decoded (`fit_pixels`:
FFmpeg's scaler converts the decoded YUV straight to the small RGB frame, so no full-size RGB
copy exists). A read keeps at most `max_frames` frames (`TooManyFrames`), so a read holds at
most max_frames x max_pixels x 3 bytes of frames. Anything PyAV cannot open or decode raises
`VideoError`, one line.

PyAV is imported when a video is opened, so importing this module costs nothing; the code
uses only APIs PyAV 14-18 share (frame.rotation is read when present, else the stream's
"rotate" metadata).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_FILE_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")


TIE = 1e-6
"""Seconds within which two frames are equally near a wanted time (the later one wins)."""
MAX_FRAMES = 1024
"""Frames one read may keep (the paper's rule keeps at most 361: 2 fps over 180 s). Beyond it a
read raises `TooManyFrames` instead of holding them all (1024 frames of 448^2: 617 MB)."""


class VideoError(ValueError):
    """A video that cannot be read (missing, not a video, no video stream, broken): one line."""


class TooManyFrames(VideoError):
    """A read that would keep more than its frame cap (names the count, the cap and the rule)."""


def fit_pixels(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most `max_pixels` (unchanged if it fits
    or max_pixels is None): the size frames are stored at (the converters' frame cap)."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def check_frame_cap(n: int, max_frames: int | None, name: str) -> None:
    if max_frames is not None and n > max_frames:
        raise TooManyFrames(f"{name}: the sampling keeps {n} frames, above the cap of {max_frames} "
                            f"(lower fps / max_duration, or raise max_frames)")


@dataclass
class Frame:
    """One decoded frame."""

    image: Image.Image
    """RGB, upright (rotation metadata applied), at the stored size."""
    t: float
    """Presentation time, seconds, on the source's clock (pts * time_base)."""


def sample_frames(timestamps: list[float], fps: float = 2.0, min_duration: float = 10.0, min_frames: int = 20,
                  max_duration: float = 180.0) -> list[int]:
    """Indices of the frames to keep, in time order (pure; paper App. "Video data").

    timestamps [F] (seconds, increasing) -> indices [K]: the nearest stored frame to each wanted
    time, without repeats (a source stored below `fps` keeps every frame). A clip shorter than
    `min_duration` gets `min_frames` uniformly spread frames; only the first `max_duration` s count."""
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    if max_duration <= 0 or min_frames < 1:
        raise ValueError(f"max_duration={max_duration} and min_frames={min_frames} must be positive")
    if not timestamps:
        return []
    t0 = timestamps[0]
    duration = min(timestamps[-1] - t0, max_duration)
    if duration < min_duration:
        n = min(min_frames, len(timestamps))
        wanted = [t0 + duration * i / max(n - 1, 1) for i in range(n)]
    else:
        # 2 fps from t0. A clip cut at max_duration samples [t0, t0 + max) (180 s -> 360
        # frames, no extra frame at exactly the cut); an uncut clip keeps its last instant
        # too, since that is where it ends (a live caption of what happens last sits there)
        capped = timestamps[-1] - t0 > max_duration
        n = max(1, math.ceil(duration * fps - 1e-9)) if capped else math.floor(duration * fps + 1e-9) + 1
        wanted = [t0 + i / fps for i in range(n)]
    picked: list[int] = []
    j = 0
    for w in wanted:
        # a tie goes to the later frame; 1e-6 s absorbs the rounding of pts * time_base, so a
        # file and its extracted frames (rounded times) pick the same frames
        while j + 1 < len(timestamps) and abs(timestamps[j + 1] - w) <= abs(timestamps[j] - w) + TIE:
            j += 1
        if not picked or picked[-1] != j:
            picked.append(j)
    return picked


def pick_at_rate(frames: Iterator, fps: float, time_of=lambda f: f.t) -> Iterator:
    """The nearest frame to each tick t0 + k / fps, without repeats, as the frames arrive
    (one frame of look-ahead): `sample_frames(ts, fps, min_duration=0, max_duration=inf)`
    for a stream whose end is not known yet."""
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    prev, tick, t0, k, last = None, None, None, 0, None
    for f in frames:
        t = time_of(f)
        if t0 is None:
            t0 = tick = t
        while tick is not None and t >= tick - 1e-9:
            # ties go to the later frame, as in sample_frames
            best = f if prev is None or abs(t - tick) <= abs(time_of(prev) - tick) + TIE else prev
            if best is not last:
                last = best
                yield best
            k += 1
            tick = t0 + k / fps
        prev = f


def rotate_upright(image: Image.Image, degrees: float) -> Image.Image:
    """Apply a display rotation (counter-clockwise degrees, as FFmpeg's display matrix)."""
    quarter = round(degrees / 90) % 4
    if abs(degrees - 90 * round(degrees / 90)) > 1e-3:
        return image.rotate(degrees, expand=True)
    return image if quarter == 0 else image.transpose((None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                                        Image.Transpose.ROTATE_270)[quarter])


def _frame_number(p: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", p.stem)
    return (int(digits[-1]) if digits else -1, p.name)


class FrameFolder:
    """A folder of extracted frames (numeric order) read through the video interface.
    Timestamps: meta.json "timestamps" if given, else index / fps (meta.json "fps" overrides)."""

    def __init__(self, path: str | Path, fps: float = 2.0, max_pixels: int | None = None):
        """max_pixels: frames are downscaled to it as they are read (None: stored size)."""
        self.path, self.max_pixels = Path(path), max_pixels
        meta = {}
        if (self.path / "meta.json").is_file():
            try:
                meta = json.loads((self.path / "meta.json").read_text())
            except json.JSONDecodeError as e:
                raise VideoError(f"{self.path}/meta.json: {e}") from None
        self.meta = meta
        self.files = sorted((p for p in self.path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_frame_number)
        if not self.files:
            raise VideoError(f"{self.path}: the folder holds no frames ({', '.join(FRAME_SUFFIXES)})")
        rate = float(meta.get("fps", fps))
        if rate <= 0:
            raise VideoError(f"{self.path}/meta.json: fps={rate} must be > 0")
        times = meta.get("timestamps") or [round(i / rate, 3) for i in range(len(self.files))]
        if len(times) != len(self.files):
            raise VideoError(f"{self.path}/meta.json: {len(times)} timestamps for {len(self.files)} frames")
        self._times = [float(t) for t in times]

    def timestamps(self) -> list[float]:
        return list(self._times)

    def iter_read(self, indices: list[int]) -> Iterator[Frame]:
        from casa.processing.image import ImageError, decode_image

        for i in indices:
            try:
                # the bounded image decode (its size limit, a reduced decode of a huge frame)
                img = decode_image(self.files[i].read_bytes(), self.max_pixels)
            except (OSError, ImageError) as e:
                raise VideoError(f"{self.files[i]}: {e}") from None
            size = fit_pixels(*img.info.get("casa_original_size", img.size), self.max_pixels)
            yield Frame(img if img.size == size else img.resize(size, Image.BICUBIC), self._times[i])

    def read(self, indices: list[int]) -> list[Frame]:
        return list(self.iter_read(indices))

    def sample_indices(self, fps: float = 2.0, min_duration: float = 10.0, min_frames: int = 20,
                       max_duration: float = 180.0, max_frames: int | None = MAX_FRAMES) -> list[int]:
        keep = sample_frames(self._times, fps, min_duration, min_frames, max_duration)
        check_frame_cap(len(keep), max_frames, str(self.path))
        return keep

    def sample(self, fps: float = 2.0, min_duration: float = 10.0, min_frames: int = 20,
               max_duration: float = 180.0, max_frames: int | None = MAX_FRAMES) -> list[Frame]:
        return self.read(self.sample_indices(fps, min_duration, min_frames, max_duration, max_frames))

    def frames_at(self, fps: float) -> Iterator[Frame]:
        """Frames nearest to each 1/fps tick, read one at a time as they are needed."""
        picked = pick_at_rate(iter(range(len(self._times))), fps, time_of=self._times.__getitem__)
        return (self.read([i])[0] for i in picked)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoFile:
    """A source PyAV opens: a file, a URL, a file object, or "-" (stdin, read as it arrives)."""

    def __init__(self, source, options: dict | None = None, threads: int | None = None,
                 max_pixels: int | None = None):
        """threads: decoder threads (None: FFmpeg's choice, all cores; 1 for one per DataLoader worker).
        max_pixels: frames are downscaled to it as they are decoded (None: stored size)."""
        import av

        self.max_pixels = max_pixels
        self.name = "stdin" if source == "-" else str(source)
        local = isinstance(source, (str, Path)) and source != "-" and "://" not in str(source)
        if local and not Path(source).is_file():
            raise VideoError(f"{self.name}: no such file")
        src = sys.stdin.buffer if source == "-" else source
        try:
            self.container = av.open(src if not isinstance(src, Path) else str(src), "r", options=options or {})
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{self.name}: cannot open as a video ({type(e).__name__}: {e})") from None
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams}) or ["none"]
            self.container.close()
            raise VideoError(f"{self.name}: no video stream (streams: {', '.join(kinds)})")
        self.stream = self.container.streams.video[0]
        if threads != 1:
            self.stream.thread_type = "AUTO"  # frame threads: decoding is most of the cost
        if threads:
            self.stream.codec_context.thread_count = threads
        self._index: tuple[list[int], list[int]] | None = None

    # ---------------------------------------------------------------- metadata
    @property
    def time_base(self) -> float:
        return float(self.stream.time_base)

    def _rotation(self, frame) -> float:
        r = getattr(frame, "rotation", None)  # PyAV >= 14.? reads the display matrix per frame
        if r is None:
            r = -float(self.stream.metadata.get("rotate", 0) or 0)  # legacy tag: clockwise degrees
        return float(r)

    def _frame(self, frame) -> Frame:
        rotation, t = self._rotation(frame), frame.pts * self.time_base  # side data stays on the decoded frame
        w, h = fit_pixels(frame.width, frame.height, self.max_pixels)
        if (w, h) != (frame.width, frame.height):
            # YUV -> small RGB in one swscale pass (bicubic, as the PIL resize it replaces): the
            # full-size RGB frame (6 MB at 1080p) is never built
            frame = frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC")
        return Frame(rotate_upright(frame.to_image(), rotation), t)

    def _packet_index(self) -> tuple[list[int], list[int]]:
        """(pts of every frame in presentation order, pts of the keyframes), from the packets
        alone (demuxing, no decoding); a file whose packets stop early ends there."""
        if self._index is None:
            import av

            pts, keys = [], []
            try:
                for packet in self.container.demux(self.stream):
                    if packet.pts is None or packet.size == 0:
                        continue
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        keys.append(packet.pts)
            except av.error.FFmpegError:
                pass  # truncated: the packets read so far are the video
            if not pts:
                raise VideoError(f"{self.name}: the video stream holds no frames")
            pts.sort()
            keys.sort()
            self._index = (pts, keys)
        return self._index

    def timestamps(self) -> list[float]:
        """Every frame's time (s), in order, from the container's pts."""
        return [p * self.time_base for p in self._packet_index()[0]]

    # ---------------------------------------------------------------- decoding
    def read(self, indices: list[int]) -> list[Frame]:
        """The frames at `indices` of `timestamps()` (increasing), seeking past stretches that
        hold a keyframe instead of decoding them."""
        return list(self.iter_read(indices))

    def iter_read(self, indices: list[int]) -> Iterator[Frame]:
        """`read`, one frame at a time (a caller that encodes each frame holds one)."""
        import av

        pts, keys = self._packet_index()
        wanted = [pts[i] for i in indices]
        if any(b <= a for a, b in zip(wanted, wanted[1:])):
            raise ValueError("indices must be increasing")
        decoded, last = None, None  # the decoding generator, the pts of the last frame it gave
        try:
            for w in wanted:
                k = bisect.bisect_right(keys, w) - 1
                key = keys[k] if k >= 0 else None
                if decoded is None or last is None or last > w or (key is not None and key > last):
                    self.container.seek(w, stream=self.stream, backward=True, any_frame=False)
                    decoded, last = self.container.decode(self.stream), None
                frame = None
                for f in decoded:
                    if f.pts is None:
                        continue
                    last = f.pts
                    if f.pts >= w:
                        frame = f
                        break
                if frame is None:
                    raise VideoError(f"{self.name}: the frame at {w * self.time_base:.3f}s cannot be decoded "
                                     f"(truncated file?)")
                yield self._frame(frame)
        except av.error.FFmpegError as e:
            raise VideoError(f"{self.name}: decoding failed ({type(e).__name__}: {e})") from None

    def sample_indices(self, fps: float = 2.0, min_duration: float = 10.0, min_frames: int = 20,
                       max_duration: float = 180.0, start: float | None = None, end: float | None = None,
                       max_frames: int | None = MAX_FRAMES) -> list[int]:
        """Indices (of `timestamps()`) of the paper's sampling of the frames in [start, end]
        (s, the container's clock); TooManyFrames above `max_frames`."""
        ts = self.timestamps()
        lo = bisect.bisect_left(ts, start - 1e-6) if start is not None else 0
        hi = bisect.bisect_right(ts, end + 1e-6) if end is not None else len(ts)
        if hi <= lo:
            raise VideoError(f"{self.name}: no frame in [{start}, {end}] s (the video spans "
                             f"{ts[0]:.2f}-{ts[-1]:.2f} s)")
        keep = [lo + i for i in sample_frames(ts[lo:hi], fps, min_duration, min_frames, max_duration)]
        check_frame_cap(len(keep), max_frames, self.name)
        return keep

    def sample(self, fps: float = 2.0, min_duration: float = 10.0, min_frames: int = 20,
               max_duration: float = 180.0, start: float | None = None, end: float | None = None,
               max_frames: int | None = MAX_FRAMES) -> list[Frame]:
        """The paper's sampling of the frames in [start, end] (s, the container's clock)."""
        return self.read(self.sample_indices(fps, min_duration, min_frames, max_duration, start, end, max_frames))

    def decode_all(self) -> Iterator[Frame]:
        """Every frame in order, decoded as the bytes arrive (pipes and URLs included); a
        stream that breaks mid-way raises VideoError after the frames before the break."""
        import av

        try:
            for f in self.container.decode(self.stream):
                if f.pts is not None:
                    yield self._frame(f)
        except av.error.FFmpegError as e:
            raise VideoError(f"{self.name}: decoding failed ({type(e).__name__}: {e})") from None

    def frames_at(self, fps: float) -> Iterator[Frame]:
        """Live: the frame nearest each 1/fps tick, decoded forward as the source arrives
        (only the kept frames are converted to images)."""
        import av

        if self._index is not None:  # the packet index was read: back to the start
            self.container.seek(0)

        def raw():
            try:
                for f in self.container.decode(self.stream):
                    if f.pts is not None:
                        yield f
            except av.error.FFmpegError as e:
                raise VideoError(f"{self.name}: decoding failed ({type(e).__name__}: {e})") from None

        return (self._frame(f) for f in pick_at_rate(raw(), fps, time_of=lambda f: f.pts * self.time_base))

    @property
    def average_fps(self) -> float | None:
        rate = self.stream.average_rate or self.stream.guessed_rate
        return float(rate) if rate else None

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_video_source(source: str | Path) -> bool:
    """A video file by suffix, a URL, or "-"."""
    s = str(source)
    return s == "-" or "://" in s or Path(s).suffix.lower() in VIDEO_FILE_SUFFIXES


def open_video(source, fps: float = 2.0, threads: int | None = None,
               max_pixels: int | None = None) -> VideoFile | FrameFolder:
    """A frame folder (`fps`: its frame rate, unless meta.json says) or anything PyAV opens;
    `max_pixels`: frames downscaled to it as they are decoded."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return FrameFolder(source, fps, max_pixels)
    return VideoFile(source, threads=threads, max_pixels=max_pixels)


def read_video(source, fps: float = 2.0, min_duration: float = 10.0, min_frames: int = 20,
               max_duration: float = 180.0, start: float | None = None, end: float | None = None,
               threads: int | None = None, max_pixels: int | None = None,
               max_frames: int | None = MAX_FRAMES) -> list[Frame]:
    """The paper's frame sampling of one video (file, URL, bytes file object, or frame folder),
    each frame downscaled to `max_pixels` as it is decoded, at most `max_frames` of them."""
    reader = open_video(source, fps, threads, max_pixels)
    try:
        if isinstance(reader, FrameFolder):
            return reader.sample(fps, min_duration, min_frames, max_duration, max_frames)
        return reader.sample(fps, min_duration, min_frames, max_duration, start, end, max_frames)
    finally:
        reader.close()
