"""Convert public dataset layouts into `data.format` shards.

    python -m data.converters llava  --json FILE --images DIR --out DIR [--prefix train]
    python -m data.converters videos --json FILE --videos DIR --out DIR [--fps 2]
    python -m data.converters livecc --jsonl FILE --videos DIR --out DIR [--fps 2]
    python -m data.converters frames --videos DIR --out DIR [--fps 2]
    python -m data.converters livecc --videos DIR --out DIR [--transcripts DIR] [--fps 2] [--align words|start]

llava   LLaVA-style JSON: [{"id", "image": "rel/path.jpg" (or a list, or absent for text-only),
        "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}].
        Each `<image>` tag marks where its image goes (the n-th tag takes the n-th image); an
        image without any tag goes first in the first human turn, as LLaVA does. Optional
        "answers" (every accepted answer of the last turn, e.g. TextVQA's 10) and "choices"
        (multiple-choice options) are kept for scoring (`data.format`).
videos  QA over video files, LLaVA-Video-178K's layout (JSON list or JSONL): {"id", "video":
        "rel/path.mp4", "conversations": [...]} with `<image>` (or `<video>`) where the clip
        goes -> "qa" video samples.
livecc  --jsonl: LiveCC's own records (Live-WhisperX-526K), one conversation per line:
        [{"role": "user", "content": [{"type": "video", "video": "rel/path.mp4", "video_start": s,
        "video_end": e}, {"type": "text", "text": prompt}]}, {"role": "assistant", "content":
        [{"type": "text_stream", "text_stream": [[word_start, word_end, word], ...]}]}]
        (a last line holding only the seek offsets is ignored) -> live-captioning ("caption")
        samples: each word goes after the first frame at or after the time it ends (what has
        been said by then, as LiveCC's training pairs frames with speech).
frames  one folder per video holding extracted frames (VIDEO/000001.jpg ...) and an
        optional VIDEO/meta.json {"fps": 2, "qa": [{"question": ..., "answer": ...}]} ->
        "qa" video samples: the video, then the QA pairs as turns.
livecc  --videos DIR alone: the same frame folders plus a timestamped transcript
        [{"start": s, "end": e, "text": ...}] (VIDEO/transcript.json, or TRANSCRIPTS/VIDEO.json).

Video files are decoded by `casa.processing.video` (PyAV) with the paper's sampling (2 fps,
20 frames for clips under 10 s, the first 180 s); each frame is downscaled to at most
--max-pixels (448^2, the paper's frame cap) as it is decoded and stored as JPEG at once, with
its container timestamp, all of a clip's frames in one member (`data.format.pack_frames`); a
clip whose sampling keeps more than --max-frames (1024) is skipped as `too_many_frames`.

Bad inputs never stop a conversion: each is skipped and counted by reason (a missing,
truncated or undecodable video counts as `bad_video`), and a summary (written, skipped by
reason, the first example of each) is printed at the end.

Only files under the given root (--images / --videos) are packed: a record's path that leaves
it (`../../x.png`, `/abs/x.png`, a symlink pointing out) is skipped as `outside_root`, since a
record from elsewhere should not be able to copy any file the user can read into a shard.
`--allow-outside-root` packs them anyway (records written with absolute paths on purpose).
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from casa.processing.image import MAX_DECODE_PIXELS
from casa.processing.video import MAX_FRAMES, TooManyFrames, VideoError, open_video
from data.dataset import VideoOptions
from data.format import ShardWriter, check_answers, encode_image, image, make_sample, pack_frames, text

IMAGE_TAG = "<image>"
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
from casa.processing.video import FRAME_SUFFIXES, VIDEO_FILE_SUFFIXES  # noqa: E402,F401  (one list of each)
NO_DECODER = ("the frame-folder form reads folders of frames; convert video files with their annotations: "
              "`videos --json QA.json --videos DIR` (LLaVA-Video QA) or `livecc --jsonl FILE --videos DIR`")


class Skip(Exception):
    """An input that cannot be converted; `reason` is the counter key of the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def under_root(root: Path, rel: str | Path, allow_outside: bool = False) -> Path:
    """`root / rel` (a record's path), or Skip("outside_root") when it resolves (`..`, an
    absolute path, symlinks followed) outside `root`, unless `allow_outside`."""
    return inside_root(root, root / rel, allow_outside, shown=rel)  # an absolute rel replaces root


def inside_root(root: Path, path: Path, allow_outside: bool = False, shown: str | Path | None = None) -> Path:
    """`path`, or Skip("outside_root") if, symlinks followed, it is not under `root`."""
    if allow_outside:
        return path
    real, real_root = path.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        raise Skip("outside_root", f"{str(shown if shown is not None else path)!r} resolves to {real}, outside "
                                   f"{root} (--allow-outside-root packs it)")
    return path


@dataclass
class Summary:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)
    """The first skip of each reason, its detail (which file, why)."""

    def table(self, title: str) -> Table:
        t = Table(title=title, min_width=len(title) + 4)  # the title on one line
        t.add_column("outcome")
        t.add_column("samples", justify="right")
        t.add_row("written", str(self.written))
        for reason, n in sorted(self.skipped.items()):
            t.add_row(f"skipped: {reason}", str(n))
        t.add_row("shards", str(len(self.shards)))
        return t

    def first_skips(self) -> list[str]:
        """One line per skip reason: its first case (printed whole, under the table)."""
        return [f"first {reason}: {self.examples[reason]}" for reason in sorted(self.examples)]


def safe_key(index: int, source_id: str) -> str:
    """A webdataset key: unique (the index), readable (the id), and free of the dots and
    slashes that webdataset would take for field or directory separators."""
    return f"{index:08d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', str(source_id))[:64]}"


def convert(items: Iterable, total: int | None, to_sample: Callable[[int, object], dict], out: str | Path,
            prefix: str, shard_size: int, desc: str, progress: bool = True) -> Summary:
    """Run `to_sample(index, item)` over `items` into `out/prefix-%06d.tar`, counting `Skip`s."""
    summary = Summary()
    columns = (TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[skipped]} skipped"))
    with Progress(*columns, disable=not progress) as bar, ShardWriter(out, prefix, max_count=shard_size) as writer:
        job = bar.add_task(desc, total=total, skipped=0)
        for i, item in enumerate(items):
            try:
                writer.write(to_sample(i, item))
                summary.written += 1
            except Skip as s:
                summary.skipped[s.reason] += 1
                summary.examples.setdefault(s.reason, str(s).removeprefix(f"{s.reason}: ")[:300])
            bar.update(job, advance=1, skipped=sum(summary.skipped.values()))
    # the writer globs PREFIX-*: keep its own shards, not those of a longer prefix in the same
    # folder (train-qa-000000.tar next to train-000000.tar)
    own = re.compile(rf"{re.escape(prefix)}-\d+\.tar")
    summary.shards = [s for s in writer.shards if own.fullmatch(Path(s).name)] if summary.written else []
    return summary


# ---------------------------------------------------------------------------------- llava
def read_image(path: Path) -> tuple[str, bytes]:
    """(extension, original bytes) of an image file; Skip if missing, undecodable or above the
    decode limit that training would refuse it at (`casa.processing.image.MAX_DECODE_PIXELS`)."""
    if not path.is_file():
        raise Skip("missing_image", str(path))
    data = path.read_bytes()
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_DECODE_PIXELS:
                raise Skip("image_too_large", f"{path}: {im.width}x{im.height} = {im.width * im.height} pixels "
                                              f"exceeds the decode limit of {MAX_DECODE_PIXELS} pixels")
            im.verify()  # header + structure check without a full decode
            fmt = (im.format or "").lower()
    except Skip:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard
        raise Skip("image_too_large", f"{path}: {e}") from None
    except Exception as e:  # PIL raises many types for truncated or foreign files
        raise Skip("corrupt_image", f"{path}: {e}") from None
    return {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt), data


def llava_sample(index: int, record: dict, image_root: Path, task: str, group: str,
                 allow_outside_root: bool = False) -> dict:
    """One LLaVA record -> a webdataset sample (user turns carry the images at their tags)."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
        raise Skip("malformed_record", repr(record)[:80])
    paths = record.get("image") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    turns = record["conversations"]
    tags = sum(str(t.get("value", "")).count(IMAGE_TAG) for t in turns if isinstance(t, dict))
    if tags not in (0, len(paths)):
        raise Skip("image_tag_mismatch", f"{tags} tags for {len(paths)} images")
    files = {}
    for k, p in enumerate(paths):
        ext, data = read_image(under_root(image_root, p, allow_outside_root))
        files[f"img{k}.{ext}"] = data
    messages, next_image = [], 0
    for t in turns:
        role = ROLE_OF.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise Skip("bad_turn", repr(t)[:80])
        content = []
        if role == "user" and tags == 0 and next_image == 0:
            content += [image(f"img{k}") for k in range(len(paths))]  # untagged images open the first human turn
            next_image = len(paths)
        pieces = t["value"].split(IMAGE_TAG)
        for k, piece in enumerate(pieces):
            if k:
                content.append(image(f"img{next_image}"))
                next_image += 1
            # the newline LLaVA puts next to a tag belongs to the tag, not to the text
            piece = piece.removeprefix("\n") if k else piece
            piece = piece.removesuffix("\n") if k < len(pieces) - 1 else piece
            if piece.strip():
                content.append(text(piece))
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant" or not any(c["type"] == "text" for c in messages[-1]["content"]):
        raise Skip("no_answer", str(record.get("id")))
    conv = {"messages": messages, "task": task, "group": group, "source_id": str(record.get("id", index)),
            # the last answer's accepted answers / options, kept for the official metrics (data.format)
            **{k: record[k] for k in ("answers", "choices") if record.get(k) is not None}}
    try:
        check_answers(conv)
    except ValueError as e:
        raise Skip("bad_answers", f"{record.get('id')}: {e}") from None
    return make_sample(safe_key(index, record.get("id", "")), conv, files)


def convert_llava(json_path: str | Path, images: str | Path, out: str | Path, prefix: str = "train",
                  shard_size: int = 1000, task: str = "llava", group: str = "general",
                  progress: bool = True, allow_outside_root: bool = False) -> Summary:
    records = json.loads(Path(json_path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of LLaVA records, got {type(records).__name__}")
    root = Path(images)
    return convert(records, len(records), lambda i, r: llava_sample(i, r, root, task, group, allow_outside_root),
                   out, prefix, shard_size, "llava", progress)


# ---------------------------------------------------------------------------------- video folders
def _frame_number(p: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", p.stem)
    return (int(digits[-1]) if digits else -1, p.name)


def video_dirs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """(frame folders, undecodable video files) directly under `root`, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--videos {str(root)!r} is not a directory")
    entries = sorted(root.iterdir())
    videos = [p for p in entries if p.is_file() and p.suffix.lower() in VIDEO_FILE_SUFFIXES]
    dirs = [p for p in entries if p.is_dir()]
    if videos and not dirs:
        raise ValueError(f"{root} holds {len(videos)} video file(s) and no frame folders: {NO_DECODER}")
    return dirs, videos


def load_frames(folder: Path, fps: float, root: Path | None = None,
                allow_outside_root: bool = False) -> tuple[dict[str, bytes], list[str], list[float], dict]:
    """Frames of one video folder (numeric order) -> (files, refs, timestamps, meta).
    Timestamps come from meta.json "timestamps" if given, else frame index / fps. With `root`,
    a frame (or the folder) that is a symlink out of it is skipped as `outside_root`."""
    meta = {}
    if (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except json.JSONDecodeError as e:
            raise Skip("malformed_meta", f"{folder}: {e}") from None
    paths = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_frame_number)
    if not paths:
        raise Skip("no_frames", str(folder))
    rate = float(meta.get("fps", fps))
    if rate <= 0:
        raise Skip("malformed_meta", f"{folder}: fps={rate} must be > 0")
    times = meta.get("timestamps") or [round(i / rate, 3) for i in range(len(paths))]
    if len(times) != len(paths):
        raise Skip("malformed_meta", f"{folder}: {len(times)} timestamps for {len(paths)} frames")
    files, refs = {}, []
    for i, p in enumerate(paths):
        ext, data = read_image(inside_root(root, p, allow_outside_root) if root is not None else p)
        refs.append(f"f{i:06d}")
        files[f"f{i:06d}.{ext}"] = data
    return files, refs, [float(t) for t in times], meta


def frames_sample(index: int, folder: Path, fps: float, task: str, group: str, root: Path | None = None,
                  allow_outside_root: bool = False) -> dict:
    files, refs, times, meta = load_frames(folder, fps, root, allow_outside_root)
    qa = meta.get("qa") or []
    pairs = [(q.get("question"), q.get("answer")) for q in qa if isinstance(q, dict)]
    if not pairs or not all(isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip() for q, a in pairs):
        raise Skip("no_qa", f"{folder}/meta.json has no usable qa pairs")
    messages = []
    for k, (q, a) in enumerate(pairs):
        content = [{"type": "video"}, text(q)] if k == 0 else [text(q)]  # the clip once, before the first question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [text(a)]}]
    conv = {"messages": messages, "task": meta.get("task", task), "group": meta.get("group", group),
            "source_id": folder.name, "video": {"frames": refs, "timestamps": times, "layout": "qa"}}
    return make_sample(safe_key(index, folder.name), conv, files)


def captions_from_transcript(segments: list, times: list[float], align: str) -> list[dict]:
    """Transcript segments -> frame-aligned captions {"t", "text"} (pure).

    align="start": a segment's whole text at the frame its start falls in.
    align="words": its words spread evenly over [start, end) (LiveCC streams words at the
    time they are spoken), then joined per frame interval, so the caption after frame i
    holds what is said while frame i is on screen. Speech before the first frame goes to
    the first frame; speech after the last frame is dropped."""
    if align not in ("start", "words"):
        raise ValueError(f"align={align!r} is not one of ['start', 'words']")
    per_frame: dict[int, list[str]] = {}
    end_of_clip = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0)  # the last frame lasts one step

    def frame_at(t: float) -> int | None:
        return None if t >= end_of_clip else max(0, bisect.bisect_right(times, t) - 1)

    for seg in segments:
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str) or "start" not in seg:
            raise Skip("malformed_transcript", repr(seg)[:80])
        start, end = float(seg["start"]), float(seg.get("end", seg["start"]))
        words = seg["text"].split()
        if align == "start":
            words, stamps = [" ".join(words)] if words else [], [start]
        else:
            stamps = [start + (max(end, start) - start) * k / len(words) for k in range(len(words))]
        for w, t in zip(words, stamps):
            i = frame_at(t)
            if i is not None:
                per_frame.setdefault(i, []).append(w)
    return [{"t": times[i], "text": " ".join(ws)} for i, ws in sorted(per_frame.items())]


def livecc_sample(index: int, folder: Path, transcripts: Path | None, fps: float, align: str, task: str,
                  group: str, root: Path | None = None, allow_outside_root: bool = False) -> dict:
    path = (transcripts / f"{folder.name}.json") if transcripts else folder / "transcript.json"
    if not path.is_file():
        raise Skip("missing_transcript", str(path))
    try:
        segments = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Skip("malformed_transcript", f"{path}: {e}") from None
    if not isinstance(segments, list):
        raise Skip("malformed_transcript", f"{path}: expected a list of segments")
    files, refs, times, meta = load_frames(folder, fps, root, allow_outside_root)
    captions = captions_from_transcript(segments, times, align)
    if not captions:
        raise Skip("empty_transcript", str(path))
    conv = {"messages": [], "task": meta.get("task", task), "group": meta.get("group", group), "source_id": folder.name,
            "video": {"frames": refs, "timestamps": times, "captions": captions, "layout": "caption"}}
    return make_sample(safe_key(index, folder.name), conv, files)


# ---------------------------------------------------------------------------------- video files
def video_frames(path: Path, sampling: VideoOptions, start: float | None = None,
                 end: float | None = None, max_frames: int | None = MAX_FRAMES) -> tuple[dict[str, bytes], dict,
                                                                                   list[float], float]:
    """A video file -> (files: the frames as one JPEG member, the "video" fields naming them
    (`data.format.pack_frames`), timestamps from the clip's first frame, that frame's time on
    the video's clock); Skip if unreadable or above `max_frames` (`too_many_frames`).

    Each frame is downscaled to the training cap as it is decoded and JPEG-encoded at once,
    so a clip costs one small frame at a time plus its JPEGs, whatever its resolution."""
    if not path.is_file():
        raise Skip("missing_video", str(path))
    jpegs, times = [], []
    try:
        with open_video(path, sampling.fps, max_pixels=sampling.frame_max_pixels) as reader:
            keep = reader.sample_indices(sampling.fps, sampling.min_duration, sampling.min_frames,
                                         sampling.max_duration, start, end, max_frames)
            for f in reader.iter_read(keep):
                jpegs.append(encode_image(f.image, "jpg"))
                times.append(f.t)
    except TooManyFrames as e:
        raise Skip("too_many_frames", str(e)) from None
    except VideoError as e:
        raise Skip("bad_video", str(e)) from None
    files, fields = pack_frames([f"f{i:06d}" for i in range(len(jpegs))], jpegs)
    return files, fields, [round(t - times[0], 3) for t in times], times[0]


def read_records(path: str | Path) -> list:
    """A JSON list, or JSONL (one record per line; blank lines ignored). A JSONL line that does
    not parse is kept as None (counted as malformed by the converter)."""
    raw = Path(path).read_text()
    if raw.lstrip().startswith("[") and not str(path).endswith(".jsonl"):
        records = json.loads(raw)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list or JSONL records")
        return records
    out = []
    for line in raw.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(None)
    return out


VIDEO_TAGS = ("<image>", "<video>")


def llava_video_sample(index: int, record: dict, root: Path, sampling: VideoOptions, task: str, group: str,
                       allow_outside_root: bool = False, max_frames: int | None = MAX_FRAMES) -> dict:
    """One LLaVA-Video-178K record -> a "qa" video sample (the clip at its tag, else first)."""
    if not isinstance(record, dict) or not isinstance(record.get("video"), str) \
            or not isinstance(record.get("conversations"), list) or not record["conversations"]:
        raise Skip("malformed_record", repr(record)[:80])
    messages, placed = [], False
    for t in record["conversations"]:
        role = ROLE_OF.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise Skip("bad_turn", repr(t)[:80])
        value, content = t["value"], []
        tag = next((g for g in VIDEO_TAGS if g in value), None)
        if role == "user" and tag and not placed:
            content.append({"type": "video"})
            placed = True
            value = value.replace(tag, "", 1)
        for g in VIDEO_TAGS:
            value = value.replace(g, "")
        if value.strip():
            content.append(text(value.strip()))
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise Skip("no_answer", str(record.get("id")))
    files, fields, times, _ = video_frames(under_root(root, record["video"], allow_outside_root), sampling,
                                           max_frames=max_frames)
    conv = {"messages": messages, "task": task, "group": group, "source_id": str(record.get("id", index)),
            "video": {**fields, "timestamps": times, "layout": "qa"}}
    return make_sample(safe_key(index, record.get("id", Path(record["video"]).stem)), conv, files)


def captions_from_words(words: list, times: list[float], offset: float = 0.0) -> list[dict]:
    """LiveCC word stream [[start, end, word], ...] -> frame-aligned captions {"t", "text"} (pure).

    A word goes after the first frame at or after its end (it has been said by then, as LiveCC
    pairs each frame chunk with the words ended before it); words ending after the last frame
    are dropped. times [K]: the kept frames' timestamps; a word's end minus `offset` is on
    their clock."""
    per_frame: dict[int, list[str]] = {}
    if not isinstance(words, list):
        raise Skip("malformed_transcript", repr(words)[:80])
    for w in words:
        try:
            end, word = float(w[1]) - offset, w[2]
            if len(w) != 3 or not isinstance(word, str):
                raise TypeError(w)
        except (TypeError, ValueError, IndexError, KeyError):
            raise Skip("malformed_transcript", repr(w)[:80]) from None
        i = bisect.bisect_left(times, end - 1e-6)
        if i < len(times) and w[2].strip():
            per_frame.setdefault(i, []).append(word.strip())
    return [{"t": times[i], "text": " ".join(ws)} for i, ws in sorted(per_frame.items())]


def livecc_record_sample(index: int, record, root: Path, sampling: VideoOptions, task: str, group: str,
                         allow_outside_root: bool = False, max_frames: int | None = MAX_FRAMES) -> dict:
    """One LiveCC conversation (see module doc) -> a "caption" video sample."""
    try:
        user, assistant = record[0], record[1]
        video = next(c for c in user["content"] if c.get("type") == "video")
        prompt = next((c["text"] for c in user["content"] if c.get("type") == "text"), None)
        stream = next(c["text_stream"] for c in assistant["content"] if c.get("type") == "text_stream")
        path = str(video["video"])
    except (TypeError, KeyError, IndexError, StopIteration, AttributeError):
        raise Skip("malformed_record", repr(record)[:80]) from None
    start, end = video.get("video_start"), video.get("video_end")
    files, fields, times, first = video_frames(under_root(root, path, allow_outside_root), sampling, start, end,
                                               max_frames)
    # the frames are rebased to 0 at the clip's first frame; the words are on the video's clock
    captions = captions_from_words(stream, times, offset=first)
    if not captions:
        raise Skip("empty_transcript", path)
    v = {**fields, "timestamps": times, "captions": captions, "layout": "caption"}
    if isinstance(prompt, str) and prompt.strip():
        v["prompt"] = prompt.strip()
    conv = {"messages": [], "task": task, "group": group, "source_id": f"{Path(path).stem}@{start or 0}", "video": v}
    return make_sample(safe_key(index, Path(path).stem), conv, files)


def convert_videos(kind: str, videos: str | Path, out: str | Path, prefix: str = "train", shard_size: int = 100,
                   fps: float = 2.0, transcripts: str | Path | None = None, align: str = "words",
                   task: str | None = None, group: str = "video", progress: bool = True,
                   allow_outside_root: bool = False) -> Summary:
    """kind="frames" (QA from meta.json) or "livecc" (transcripts) over the folders of `videos`."""
    dirs, undecodable = video_dirs(videos)
    root = Path(videos)
    if kind == "frames":
        fn = lambda i, d: frames_sample(i, d, fps, task or "video_qa", group, root, allow_outside_root)  # noqa: E731
    elif kind == "livecc":
        if align not in ("start", "words"):
            raise ValueError(f"align={align!r} is not one of ['start', 'words']")
        tdir = Path(transcripts) if transcripts else None
        fn = lambda i, d: livecc_sample(i, d, tdir, fps, align, task or "live_caption", group, root,  # noqa: E731
                                        allow_outside_root)
    else:
        raise ValueError(f"kind={kind!r} is not one of ['frames', 'livecc']")
    summary = convert(dirs, len(dirs), fn, out, prefix, shard_size, kind, progress)
    if undecodable:
        summary.skipped["video_file_not_decoded"] += len(undecodable)
    return summary


def is_seek_index(record) -> bool:
    """LiveCC's JSONL ends with a line of byte offsets (a list of ints), not a record."""
    return isinstance(record, list) and bool(record) and all(isinstance(x, int) for x in record)


def convert_video_files(kind: str, annotations: str | Path, videos: str | Path, out: str | Path,
                        prefix: str = "train", shard_size: int = 100, sampling: VideoOptions | None = None,
                        task: str | None = None, group: str = "video", progress: bool = True,
                        allow_outside_root: bool = False, max_frames: int | None = MAX_FRAMES) -> Summary:
    """kind="videos" (LLaVA-Video QA records) or "livecc" (LiveCC conversations) over the video
    files under `videos` (paths in the records are relative to it; absolute or escaping ones
    only with `allow_outside_root`)."""
    root, sampling = Path(videos), sampling or VideoOptions()
    if not root.is_dir():
        raise ValueError(f"--videos {str(root)!r} is not a directory")
    records = [r for r in read_records(annotations) if not is_seek_index(r)]
    if kind == "videos":
        fn = lambda i, r: llava_video_sample(i, r, root, sampling, task or "video_qa", group,  # noqa: E731
                                             allow_outside_root, max_frames)
    elif kind == "livecc":
        fn = lambda i, r: livecc_record_sample(i, r, root, sampling, task or "live_caption", group,  # noqa: E731
                                               allow_outside_root, max_frames)
    else:
        raise ValueError(f"kind={kind!r} is not one of ['videos', 'livecc']")
    return convert(records, len(records), fn, out, prefix, shard_size, kind, progress)


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> Summary:
    p = argparse.ArgumentParser(prog="python -m data.converters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for PREFIX-%%06d.tar")
    common.add_argument("--prefix", default="train", help="shard name prefix, e.g. train or val")
    common.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    common.add_argument("--task", default=None, help="task name recorded in each sample (metrics group by it)")
    common.add_argument("--group", default=None, help="group name recorded in each sample")
    common.add_argument("--allow-outside-root", action="store_true",
                        help="pack files whose paths leave --images/--videos (.., absolute paths, symlinks "
                             "pointing out); by default they are skipped as outside_root")
    lp = sub.add_parser("llava", parents=[common], help="LLaVA-style JSON + image folder",
                        description="LLaVA-style JSON + image folder; missing or corrupt images are skipped "
                                    "and counted")
    lp.add_argument("--json", required=True, help="the LLaVA JSON list")
    lp.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--fps", type=float, default=2.0, help="frames kept per second of video (paper: 2)")
    files.add_argument("--min-duration", type=float, default=10.0, help="shorter clips get --min-frames frames")
    files.add_argument("--min-frames", type=int, default=20, help="frames of a clip shorter than --min-duration")
    files.add_argument("--max-duration", type=float, default=180.0, help="seconds of each clip kept")
    files.add_argument("--max-pixels", type=int, default=448 * 448,
                       help="frames are downscaled to this as they are decoded, and stored so")
    files.add_argument("--max-frames", type=int, default=MAX_FRAMES,
                       help="a clip whose sampling keeps more frames is skipped as too_many_frames")
    vp = sub.add_parser("videos", parents=[common, files], help="video files + LLaVA-Video-178K QA JSON/JSONL",
                        description="QA over video files (LLaVA-Video-178K layout); unreadable videos are "
                                    "skipped and counted")
    vp.add_argument("--json", required=True, help="the QA records (JSON list or JSONL)")
    vp.add_argument("--videos", required=True, help="folder the records' video paths are relative to")
    for name, extra in (("frames", "optional VIDEO/meta.json with fps and qa pairs"),
                        ("livecc", "timestamped transcripts")):
        what = f"folders of extracted frames + {extra}"
        parents = [common, files] if name == "livecc" else [common]
        vp = sub.add_parser(name, parents=parents, help=what if name == "frames" else
                            "LiveCC JSONL over video files (--jsonl), or frame folders + transcripts",
                            description=f"{what}. {NO_DECODER}." if name == "frames" else
                            "--jsonl: LiveCC's records over video files; without it: " + what)
        vp.add_argument("--videos", required=True, help="folder of the video files (--jsonl) or of per-video "
                                                        "frame folders (VIDEO/000001.jpg ...)")
        if name == "frames":
            vp.add_argument("--fps", type=float, default=2.0,
                            help="frame rate of the extracted frames (meta.json overrides)")
        else:
            vp.add_argument("--jsonl", default=None, help="LiveCC's JSONL (word-level text_stream records)")
            vp.add_argument("--transcripts", default=None, help="frame folders: folder of VIDEO.json "
                                                                "(default VIDEO/transcript.json)")
            vp.add_argument("--align", choices=("words", "start"), default="words",
                            help="frame folders: words spreads each segment's words over [start, end); "
                                 "start: whole segment at start")
    a = p.parse_args(argv)
    try:
        if a.kind == "llava":
            s = convert_llava(a.json, a.images, a.out, a.prefix, a.shard_size or 1000, a.task or "llava",
                              a.group or "general", allow_outside_root=a.allow_outside_root)
        elif a.kind == "videos" or getattr(a, "jsonl", None):
            sampling = VideoOptions(a.fps, a.min_duration, a.min_frames, a.max_duration, a.max_pixels)
            s = convert_video_files(a.kind, a.json if a.kind == "videos" else a.jsonl, a.videos, a.out, a.prefix,
                                    a.shard_size or 100, sampling, a.task, a.group or "video",
                                    allow_outside_root=a.allow_outside_root, max_frames=a.max_frames)
        else:
            s = convert_videos(a.kind, a.videos, a.out, a.prefix, a.shard_size or 100, a.fps,
                               getattr(a, "transcripts", None), getattr(a, "align", "words"), a.task,
                               a.group or "video", allow_outside_root=a.allow_outside_root)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    Console().print(s.table(f"{a.kind} -> {a.out}"))
    for line in s.first_skips():
        print(line)  # plain: paths are not rich markup, and a table cell would wrap them
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
