"""The on-disk sample format: one conversation per webdataset sample.

A shard is a plain tar (webdataset layout). Files of one sample share the key prefix
`KEY.`; the rest of the file name is the field name:

    KEY.json        the conversation (below), UTF-8 JSON
    KEY.img0.png    image bytes referenced by the conversation as "img0" (png/jpg/webp...)
    KEY.frames.mjpeg  a video's frames, JPEG files back to back (Motion JPEG: `ffplay -f mjpeg`
                    plays it); frame i is bytes [frame_offsets[i], frame_offsets[i + 1])
    KEY.f000.jpg    older layout, still read: one member per frame, named in "video.frames"

The JSON:

    {
      "messages": [
        {"role": "system",    "content": [{"type": "text", "text": "..."}]},           # optional
        {"role": "user",      "content": [{"type": "image", "ref": "img0"},
                                          {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
      ],
      "task": "color", "group": "coarse",            # metrics are grouped by these
      "answers": ["red", "dark red"],                 # optional: every accepted answer of the LAST
                                                      # assistant turn (DocVQA's list, TextVQA's 10 human
                                                      # answers, duplicates kept); scored by
                                                      # casa.train.metrics, the turn's text is the target
      "choices": ["red", "green", "blue"],            # optional: the options of a multiple-choice
                                                      # question (the answer is one of them, or its letter)
      "video": {                                      # only for video samples
        "frames": ["f000", "f001", ...],              # frame names, in time order
        "frame_file": "frames",                       # the member holding them all (absent: one
        "frame_offsets": [0, 1843, 3702, ...],        #   member per frame); len(frames) + 1 offsets
        "timestamps": [0.0, 0.5, ...],                # seconds, one per frame
        "captions": [{"t": 0.4, "text": "..."}],      # optional: live-captioning transcript
        "layout": "qa" | "caption"                    # one window for all frames, or one per frame
      }
    }

Images appear in the order of the message content. A video sample places a single
`{"type": "video"}` item where its frames go ("qa" layout); with the "caption" layout the
conversation is built from the frames and the transcript by `data.video`.
Message roles are `system`, `user`, `assistant`; content item types are `text`, `image`,
`video`. Anything else is a malformed sample, skipped and counted by `data.dataset`.
"""

from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds
from PIL import Image

from casa.atomic import AtomicFile

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image", "video")
VIDEO_LAYOUTS = ("qa", "caption")


def text(s: str) -> dict[str, str]:
    return {"type": "text", "text": s}


def image(ref: str) -> dict[str, str]:
    return {"type": "image", "ref": ref}


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper())
    return buf.getvalue()


FRAME_FILE = "frames"
"""Field name of the member that holds a clip's frames (`pack_frames`)."""


def pack_frames(refs: list[str], jpegs: list[bytes]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A clip's frames -> ({"frames.mjpeg": the JPEGs back to back}, the "video" JSON fields
    that locate them). One tar member per clip instead of one per frame: reading a member
    costs a tar header (a pax header each, in webdataset's tars), which took a fifth of the
    training reader's time on 56² frames; the frames stay the converters' JPEG bytes."""
    if len(refs) != len(jpegs) or not refs:
        raise ValueError(f"pack_frames needs one JPEG per frame name and at least one: {len(refs)} names, "
                         f"{len(jpegs)} JPEGs")
    offsets = [0]
    for b in jpegs:
        offsets.append(offsets[-1] + len(b))
    return {f"{FRAME_FILE}.mjpeg": b"".join(jpegs)}, {"frames": list(refs), "frame_file": FRAME_FILE,
                                                      "frame_offsets": offsets}


def unpack_frames(video: dict[str, Any], files: dict[str, bytes]) -> dict[str, bytes]:
    """{frame name: its bytes} of a video sample, from either layout. files: the sample's
    members keyed by field name without extension ("f000", "frames"). In the per-frame layout
    the frames present are returned (a missing one is the reader's to report, by name); the
    packed layout raises KeyError when its member is absent, ValueError when the offsets do
    not fit it."""
    refs = [str(r) for r in video["frames"]]
    name = video.get("frame_file")
    if name is None:  # one member per frame
        return {r: files[r] for r in refs if r in files}
    data, offsets = files[name], video.get("frame_offsets")
    ok = (isinstance(offsets, list) and len(offsets) == len(refs) + 1 and all(type(o) is int for o in offsets)
          and offsets[0] == 0 and offsets[-1] == len(data) and all(a <= b for a, b in zip(offsets, offsets[1:])))
    if not ok:
        raise ValueError(f"video.frame_offsets must be {len(refs) + 1} increasing integers from 0 to the "
                         f"{len(data)} bytes of member {name!r}, got {str(offsets)[:80]}")
    return {r: data[offsets[i]:offsets[i + 1]] for i, r in enumerate(refs)}


def make_sample(key: str, conversation: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """Build the dict `webdataset.TarWriter` writes: `files` maps field names ("img0.png")
    to bytes. The conversation is checked against the format before it is written."""
    check_conversation(conversation, available={f.split(".")[0] for f in files})
    sample: dict[str, Any] = {"__key__": key, "json": json.dumps(conversation).encode()}
    sample.update(files)
    return sample


def check_conversation(conv: dict[str, Any], available: set[str]) -> None:
    """Raise ValueError naming what is wrong with a conversation (writer-side check)."""
    messages = conv.get("messages")
    caption = (conv.get("video") or {}).get("layout") == "caption"
    if not isinstance(messages, list) or (not messages and not caption):
        raise ValueError("conversation.messages must be a non-empty list (it may be empty only for a live-captioning video)")
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"message role {m.get('role')!r} is not one of {list(ROLES)}")
        for item in m.get("content", []):
            kind = item.get("type")
            if kind not in CONTENT_TYPES:
                raise ValueError(f"content type {kind!r} is not one of {list(CONTENT_TYPES)}")
            if kind == "image" and item.get("ref") not in available:
                raise ValueError(f"image ref {item.get('ref')!r} has no file in the sample")
    check_answers(conv)
    video = conv.get("video")
    if video is not None:
        if video.get("layout", "qa") not in VIDEO_LAYOUTS:
            raise ValueError(f"video.layout={video.get('layout')!r} is not one of {list(VIDEO_LAYOUTS)}")
        frames, ts = video.get("frames", []), video.get("timestamps", [])
        if len(frames) != len(ts) or not frames:
            raise ValueError("video.frames and video.timestamps must be non-empty and of equal length")
        packed = video.get("frame_file")
        missing = [f for f in ([packed] if packed is not None else frames) if f not in available]
        if missing:
            raise ValueError(f"video frames {missing[:3]} have no file in the sample")
        if packed is not None and len(video.get("frame_offsets", [])) != len(frames) + 1:
            raise ValueError(f"video.frame_offsets must hold len(frames) + 1 = {len(frames) + 1} offsets")


def check_answers(conv: dict[str, Any]) -> None:
    """The optional "answers" / "choices" fields (ValueError naming the problem)."""
    answers, choices = conv.get("answers"), conv.get("choices")
    if answers is not None and (not isinstance(answers, list) or not answers
                                or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise ValueError(f"conversation.answers={answers!r} must be a non-empty list of non-empty strings")
    if choices is None:
        return
    if (not isinstance(choices, list) or not 2 <= len(choices) <= 26 or len(set(choices)) != len(choices)
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise ValueError(f"conversation.choices={choices!r} must be a list of 2..26 distinct non-empty strings")
    last = conv["messages"][-1] if conv["messages"] else {}
    said = "".join(c.get("text", "") for c in last.get("content", []) if c.get("type") == "text")
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    accepted = answers or ([said] if last.get("role") == "assistant" else [])
    if accepted and not any(a.strip() in choices or a.strip() in letters for a in accepted):
        raise ValueError(f"the answer {accepted[0]!r} is none of conversation.choices={choices} (nor a letter A-"
                         f"{letters[-1]})")


class ShardWriter:
    """Write samples into `DIR/PREFIX-%06d.tar` shards of at most `max_count` samples.

    A thin wrapper over `webdataset.ShardWriter` that creates the directory, keeps the
    list of shards written and silences webdataset's per-shard prints (we show a rich
    progress bar in the callers instead)."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, max_count: int = 1000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pattern = str(self.out_dir / f"{prefix}-%06d.tar")
        self.count = 0
        # a fixed mtime makes shards byte-identical across runs (deterministic generators); each
        # shard is written beside its final name and renamed when complete (casa.atomic): a full
        # disk or a kill never leaves a truncated shard under a name readers glob
        self._open: dict[str, AtomicFile] = {}
        self._writer = wds.ShardWriter(self.pattern, maxcount=max_count, verbose=0, mtime=0.0,
                                       opener=lambda name: self._open.setdefault(name, AtomicFile(name)).file,
                                       post=lambda name: self._open.pop(name).commit())

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(sample)
        self.count += 1

    def write_all(self, samples: Iterable[dict[str, Any]]) -> None:
        for s in samples:
            self.write(s)

    @property
    def shards(self) -> list[str]:
        # with the shard being written, which gets its name when closed
        return sorted({str(p) for p in self.out_dir.glob(Path(self.pattern).name.replace("%06d", "*"))} | set(self._open))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # the shard being written is incomplete: it never gets its name
            for f in self._open.values():
                f.discard()


def expand_shards(pattern: str, split: str = "train") -> list[str]:
    """A directory, glob or brace pattern -> sorted existing shard paths; clear errors otherwise
    (here, not in data.datamodule: inference reads shards without importing Lightning).

    `dir` -> `dir/{split}-*.tar`; `a-{000..003}.tar` -> 4 paths (each must exist);
    `a-*.tar` -> the matches (at least one)."""
    if not pattern:
        raise ValueError(f"empty shard pattern for the {split} split")
    import braceexpand

    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, f"{split}-*.tar")
    paths: list[str] = []
    for p in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else ([p] if os.path.isfile(p) else [])
        if not matches:
            raise FileNotFoundError(f"no shard matches {p!r} (from {split} pattern {pattern!r})")
        paths.extend(matches)
    return paths
