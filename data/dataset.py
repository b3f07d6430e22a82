"""Shards -> packed batches: the streaming dataset.

    shards --(rank, worker split)--> raw samples --shuffle buffer--> SampleProcessor
           --> Sample --> Packer --> PackedBatch rows --> batches of `rows_per_batch` rows

Bad input never stops the stream: a sample is skipped, counted by reason (`SKIP_REASONS`)
and logged with its key; a shard that yields nothing counts as `empty_shard`, a tar that
breaks mid-way as `corrupt_shard` (its samples before the break are kept).

Splitting: there are `world_size * num_workers` reader slots (rank-major). With at least
as many shards as slots, each slot reads its own shards; with fewer (e.g. one validation
shard, two workers on two ranks), every slot reads every shard and keeps the samples
whose index modulo the slot count is its own. Either way each sample is read exactly once
per epoch (webdataset's own splitters would instead raise "No samples found").

Validation (`equal_batches=True`) splits batches instead: under FSDP2 every forward is a
collective, so every rank must see the same number of batches. Every reader packs the
whole pass identically, rank r keeps batches r, r + world_size, ...; a rank left one short
gets a padding batch (a copy of batch 0 whose samples carry meta "padding": True, scored
by nobody). Each real batch goes to exactly one rank:

    batches of the pass   b0 b1 b2 b3 b4        world_size 2
    rank 0                b0    b2    b4
    rank 1                   b1    b3    pad(b0)

Determinism and resume: the stream of a slot depends only on (seed, epoch, slot), so a
resumed run fast-forwards by regenerating and discarding the batches already consumed
(`skip_batches`) and continues exactly where it stopped. The DataLoader serves workers
round-robin, so resuming after C batches rotates which original slot each worker plays
(see `reader_slot`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from casa.batch import PackedBatch, collate_packed, image_token_count
from casa.processing.image import MERGE, MIN_PIXELS, ImageError, ImageTooLarge, decode_image, patchify_many
from casa.processing.sample import Sample
from casa.processing.template import ChatTemplate
from data.format import CONTENT_TYPES, ROLES, unpack_frames
from data.packing import Packer
from data.video import CAPTION_PROMPT, expand_video, sample_frames

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "malformed_json", "missing_image", "empty_answer", "oversize", "empty_shard",
                "corrupt_shard", "image_too_large")


class SkipSample(Exception):
    """A sample (or shard) the stream drops, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"skip reason {reason!r} is not one of {list(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class VideoOptions:
    """Frame sampling of video samples (paper App. "Video data")."""

    fps: float = 2.0
    min_duration: float = 10.0
    min_frames: int = 20
    max_duration: float = 180.0
    frame_max_pixels: int = 448 * 448
    caption_prompt: str = CAPTION_PROMPT
    layout: str = "qa"
    """Layout of samples whose JSON names none."""


def _check_messages(conv: Any) -> list[dict]:
    """The conversation's messages, or ValueError/KeyError/TypeError naming what is wrong."""
    if not isinstance(conv, dict):
        raise TypeError(f"the JSON is a {type(conv).__name__}, not an object")
    messages = conv["messages"]
    video = conv.get("video")
    if video is not None and not isinstance(video, dict):
        raise TypeError("video must be an object")
    caption = video is not None and video.get("layout") == "caption"
    if not isinstance(messages, list) or (not messages and not caption):
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"role {m['role']!r} is not one of {list(ROLES)}")
        if not isinstance(m["content"], list):
            raise TypeError("message content must be a list")
        for c in m["content"]:
            if c["type"] not in CONTENT_TYPES:
                raise ValueError(f"content type {c['type']!r} is not one of {list(CONTENT_TYPES)}")
            if c["type"] == "text" and not isinstance(c["text"], str):
                raise TypeError("text content must be a string")
            if c["type"] == "image" and not isinstance(c["ref"], str):
                raise TypeError("image ref must be a string")
    return messages


class SampleProcessor:
    """Raw webdataset sample (dict of field -> bytes) -> `Sample`, or raises `SkipSample`.

    Args:
        template: chat template.
        max_pixels / min_pixels: image pixel range (frames use min(max_pixels, video.frame_max_pixels)).
        video: frame sampling options.
    """

    def __init__(self, template: ChatTemplate, max_pixels: int = 896 * 896, min_pixels: int = MIN_PIXELS,
                 video: VideoOptions | None = None):
        self.template = template
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.video = video or VideoOptions()

    def __call__(self, raw: dict[str, Any]) -> Sample:
        key = raw.get("__key__", "?")
        try:
            conv = json.loads(raw["json"])
            if isinstance(conv, dict) and isinstance(conv.get("video"), dict):
                conv["video"].setdefault("layout", self.video.layout)
            messages = _check_messages(conv)
        except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise SkipSample("malformed_json", f"{key}: {type(e).__name__}: {e}") from None
        max_pixels = self.max_pixels
        if conv.get("video") is not None:
            messages, max_pixels = self._expand_video(key, conv)
        answers = [c["text"] for m in messages if m["role"] == "assistant" for c in m["content"] if c["type"] == "text"]
        if not any(a.strip() for a in answers):
            raise SkipSample("empty_answer", f"{key}: no assistant answer with text")
        caption = (conv.get("video") or {}).get("layout") == "caption"
        last = messages[-1]
        if not caption and (last["role"] != "assistant"
                            or not "".join(c.get("text", "") for c in last["content"]).strip()):
            # evaluation generates the last answer: it must exist (silence is only a target in live captioning)
            raise SkipSample("empty_answer", f"{key}: the last turn is not a non-empty assistant answer")
        files = {k.split(".")[0]: v for k, v in raw.items() if not k.startswith("__") and k != "json"}
        if conv.get("video") is not None:
            try:  # a clip's frames: one member for them all, or (older shards) one member each
                files.update(unpack_frames(conv["video"], files))
            except KeyError as e:
                raise SkipSample("missing_image", f"{key}: video frame member {e} is not in the sample "
                                                  f"(it has {sorted(files)})") from None
            except (TypeError, ValueError) as e:
                raise SkipSample("malformed_json", f"{key}: video: {type(e).__name__}: {e}") from None
        decoded, refs = [], []
        for m in messages:
            for c in m["content"]:
                if c["type"] != "image":
                    continue
                data = files.get(c["ref"])
                if data is None:
                    raise SkipSample("missing_image", f"{key}: the conversation refers to image {c['ref']!r} "
                                                      f"but the sample only has {sorted(files)}")
                try:
                    decoded.append(decode_image(data, max_pixels))
                    refs.append(c["ref"])
                except ImageTooLarge as e:  # above casa.processing.image.MAX_DECODE_PIXELS: never decoded
                    raise SkipSample("image_too_large", f"{key}: image {c['ref']!r}: {e}") from None
                except ImageError as e:
                    raise SkipSample("corrupt_image", f"{key}: image {c['ref']!r}: {e}") from None
        try:  # a video's frames share a size: patchified as one tensor
            patched = patchify_many(decoded, max_pixels, self.min_pixels)
        except ImageError as e:
            raise SkipSample("corrupt_image", f"{key}: image {refs[getattr(e, 'index', 0)]!r}: {e}") from None
        pixels, grids = [p for p, _ in patched], [g for _, g in patched]
        try:
            enc = self.template.encode(messages, image_token_count(grids, MERGE))
        except (KeyError, TypeError, ValueError) as e:
            raise SkipSample("malformed_json", f"{key}: cannot encode: {type(e).__name__}: {e}") from None
        if any(p >= len(enc.input_ids) for p in enc.image_positions):
            raise SkipSample("malformed_json", f"{key}: an image is the last item of the conversation")
        meta = {"key": key, "task": conv.get("task", "unknown"), "group": conv.get("group", "unknown"),
                "answer": enc.answer, "prompt_len": enc.prompt_len,
                # the last answer's accepted answers and options, when the shard has them (data.format)
                **{k: conv[k] for k in ("answers", "choices") if conv.get(k)}}
        return Sample(enc.input_ids, enc.answer_mask, enc.image_positions, pixels, grids, meta)

    def _expand_video(self, key: str, conv: dict) -> tuple[list[dict], int]:
        """Sample the frames and rewrite the conversation -> (messages, frame pixel cap)."""
        o = self.video
        try:
            v = conv["video"]
            frames, times = [str(f) for f in v["frames"]], [float(t) for t in v["timestamps"]]
            if len(frames) != len(times) or not frames:
                raise ValueError("video.frames and video.timestamps differ in length or are empty")
            if any(b < a for a, b in zip(times, times[1:])):
                raise ValueError("video.timestamps must be increasing")
            keep = sample_frames(times, o.fps, o.min_duration, o.min_frames, o.max_duration)
            end = times[0] + o.max_duration if times[-1] - times[0] > o.max_duration else float("inf")
            messages = expand_video(conv, [frames[i] for i in keep], [times[i] for i in keep], o.caption_prompt, end)
            _check_messages({"messages": messages, "video": v})
        except (KeyError, TypeError, ValueError) as e:
            raise SkipSample("malformed_json", f"{key}: video: {type(e).__name__}: {e}") from None
        return messages, min(self.max_pixels, o.frame_max_pixels)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) as given, or from torch.distributed (single process: (0, 1))."""
    if rank is None or world_size is None:
        rank, world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank, world_size


def reader_slot(skip_batches: int = 0, rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int]:
    """-> (slot, number of slots, batches to skip) of this reader: rank-major, then worker.

    The DataLoader serves workers round-robin starting with worker 0, so batch i of a run
    comes from worker i % nw. After consuming C batches, resumed output j must be original
    batch C + j: worker w therefore continues the stream of original worker (C + w) % nw,
    from that stream's batch (C + w) // nw."""
    rank, world_size = _rank_world(rank, world_size)
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    original = (wid + skip_batches) % nw
    return rank * nw + original, world_size * nw, (skip_batches + wid) // nw


class ShardStream(IterableDataset):
    """Packed batches from shards.

    Args:
        urls: shard paths (already expanded, see `data.datamodule.expand_shards`).
        processor: raw sample -> Sample.
        packer: keyword arguments of `data.packing.Packer`.
        rows_per_batch: rows collated into one batch.
        shuffle: shuffle shard order and samples (seeded by seed and epoch); off for validation.
        repeat: loop over epochs forever (training) or stop after one pass.
        seed: base seed.
        shuffle_buffer: samples in the shuffle buffer.
        skip_batches: batches to fast-forward (resume); set by the DataModule.
        rank / world_size: set by the DataModule from the trainer (None: torch.distributed).
        equal_batches: split batches, not samples, across ranks so that every rank gets the
            same number (see the module doc); needs repeat=False. Every reader then reads and
            processes the whole pass, so more than one DataLoader worker adds no speed.
    """

    def __init__(self, urls: list[str], processor: SampleProcessor, packer: dict[str, Any], rows_per_batch: int = 1,
                 shuffle: bool = True, repeat: bool = True, seed: int = 0, shuffle_buffer: int = 256,
                 skip_batches: int = 0, rank: int | None = None, world_size: int | None = None,
                 equal_batches: bool = False):
        super().__init__()
        if equal_batches and (repeat or skip_batches):
            raise ValueError(f"ShardStream.equal_batches=True evens out one pass: it needs repeat=False and "
                             f"skip_batches=0, not repeat={repeat}, skip_batches={skip_batches}")
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"shard(s) {missing[:3]} do not exist ({len(missing)} of {len(urls)} missing)")
        if rows_per_batch < 1:
            raise ValueError(f"ShardStream.rows_per_batch={rows_per_batch} must be >= 1")
        self.urls, self.processor, self.packer_args = list(urls), processor, dict(packer)
        self.rows_per_batch, self.shuffle, self.repeat = rows_per_batch, shuffle, repeat
        self.seed, self.shuffle_buffer, self.skip_batches = seed, shuffle_buffer, skip_batches
        self.rank, self.world_size, self.equal_batches = rank, world_size, equal_batches
        self.counts: Counter = Counter()
        self.last_packer: Packer | None = None
        probe = Packer(**self.packer_args)
        self.max_text, self.max_image = probe.max_text, probe.max_image

    # ------------------------------------------------------------------ samples
    def _skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        log.warning("skipped %s", detail if detail.startswith(reason) else f"{reason}: {detail}")

    def raw_samples(self, epoch: int = 0, slot: int = 0, slots: int = 1) -> Iterator[dict]:
        """The raw samples of reader `slot` of `slots` in `epoch`, in shard order."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 7919 + epoch).shuffle(urls)
        by_shard = len(urls) >= slots
        mine = urls[slot::slots] if by_shard else urls
        index = 0
        for url in mine:
            n, broken = 0, False
            try:
                for raw in wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                          empty_check=False):
                    n += 1
                    if not by_shard:
                        index += 1
                        if (index - 1) % slots != slot:
                            continue
                    self.counts["samples_read"] += 1
                    yield raw
            except Exception as e:  # an unreadable tar: count it, keep streaming
                broken = True
                self._skip("corrupt_shard", f"the rest of shard {url}: {type(e).__name__}: {e}")
            if n == 0 and not broken:
                self._skip("empty_shard", f"shard {url} holds no samples")

    def _shuffled(self, it: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from it
            return
        buf: list[dict] = []
        for x in it:
            buf.append(x)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def samples(self, epoch: int = 0, slot: int = 0, slots: int = 1) -> Iterator[Sample]:
        """Processed, valid samples that fit an empty row; everything else is counted."""
        rng = random.Random(self.seed * 104729 + epoch * 131 + slot)
        for raw in self._shuffled(self.raw_samples(epoch, slot, slots), rng):
            try:
                s = self.processor(raw)
            except SkipSample as e:
                self._skip(e.reason, str(e))
                continue
            if s.num_text > self.max_text or s.num_image_tokens > self.max_image:
                self._skip("oversize", f"{s.meta['key']}: {s.num_text} text tokens (cap {self.max_text}), "
                                       f"{s.num_image_tokens} image tokens (cap {self.max_image})")
                continue
            self.counts["samples_kept"] += 1
            yield s

    # ------------------------------------------------------------------ batches
    def batches(self, slot: int = 0, slots: int = 1) -> Iterator[PackedBatch]:
        """The batches of reader `slot` (no skipping), epoch after epoch if `repeat`."""
        epoch = 0
        while True:
            packer = Packer(**self.packer_args)
            self.last_packer = packer
            rows: list[PackedBatch] = []
            produced = False
            for row in packer.pack(self.samples(epoch, slot, slots)):
                produced = True
                rows.append(row)
                if len(rows) == self.rows_per_batch:
                    yield collate_packed(rows)
                    rows = []
            if rows:
                yield collate_packed(rows)
            epoch += 1
            self.counts["epochs"] += 1
            if not self.repeat:
                return
            if not produced:
                raise RuntimeError(f"no usable sample in {len(self.urls)} shard(s) for reader slot {slot}/{slots}: "
                                   f"counts {dict(self.counts)}")

    def __iter__(self) -> Iterator[PackedBatch]:
        if self.equal_batches:
            yield from self._equal_batches()
            return
        slot, slots, skip = reader_slot(self.skip_batches, self.rank, self.world_size)
        for i, b in enumerate(self.batches(slot, slots)):
            if i >= skip:
                yield b

    def _equal_batches(self) -> Iterator[PackedBatch]:
        """This rank's share of one pass, padded to ceil(batches / world_size); a rank's
        DataLoader workers take its batches in turn (the loader serves them round-robin)."""
        rank, world = _rank_world(self.rank, self.world_size)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        first, n = None, 0
        for i, b in enumerate(self.batches(0, 1)):
            first = b if first is None else first
            n = i + 1
            if i % world == rank and (i // world) % nw == wid:
                yield b
        mine = len(range(rank, n, world))
        if first is not None and mine < -(-n // world) and mine % nw == wid:
            yield replace(first, meta=[{**m, "padding": True} for m in first.meta])

    def stats(self) -> dict[str, int]:
        """Counters of this process: samples_read, samples_kept, epochs and one per skip reason."""
        out = {"samples_read": 0, "samples_kept": 0, **{r: 0 for r in SKIP_REASONS}}
        out.update(self.counts)
        return out
