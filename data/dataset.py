"""Shards -> packed batches: the streaming dataset.

    shards ──(rank/worker split)──> raw samples ──> SampleProcessor ──> Sample ──> Packer ──> PackedBatch

Bad input never stops the stream: a sample is skipped and counted by reason (`SKIP_REASONS`)
with its key logged, and a shard that yields nothing is counted as `empty_shard`.

Splitting: there are `world_size * num_workers` reader slots. With at least as many
shards as slots, each slot reads its own shards; with fewer (e.g. one validation shard and
two workers on two ranks), every slot reads every shard and keeps the samples whose index
modulo the slot count is its own. Either way each sample is read exactly once per epoch.

Determinism and resume: the stream of a slot depends only on (seed, epoch, slot), so a
resumed run fast-forwards by regenerating and discarding the batches already consumed
(`skip_batches`), and continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from casa.batch import PackedBatch, collate_packed
from data.format import CONTENT_TYPES, ROLES
from data.image import ImageError, decode_image, patchify
from data.packing import Packer, Sample
from data.templates import ChatTemplate
from data.video import expand_video, sample_frames

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "malformed_json", "missing_image", "empty_answer", "oversize", "empty_shard",
                "corrupt_shard")


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class VideoOptions:
    fps: float = 2.0
    min_duration: float = 10.0
    min_frames: int = 20
    max_duration: float = 180.0
    frame_max_pixels: int = 448 * 448
    caption_prompt: str = "Describe what happens."


class SampleProcessor:
    """Raw webdataset sample (dict of field -> bytes) -> `Sample`, or `SkipSample(reason)`."""

    def __init__(self, template: ChatTemplate, max_pixels: int = 896 * 896, min_pixels: int = 56 * 56,
                 video: VideoOptions | None = None):
        self.template = template
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.video = video or VideoOptions()

    @staticmethod
    def _file(raw: dict[str, Any], ref: str) -> bytes | None:
        for k, v in raw.items():
            if k.split(".")[0] == ref and not k.startswith("__") and k != "json":
                return v
        return None

    def __call__(self, raw: dict[str, Any]) -> Sample:
        key = raw.get("__key__", "?")
        try:
            conv = json.loads(raw["json"])
            messages = conv["messages"]
            caption = isinstance(conv.get("video"), dict) and conv["video"].get("layout") == "caption"
            if not isinstance(messages, list) or (not messages and not caption):
                raise ValueError("messages must be a non-empty list")
            for m in messages:
                if m["role"] not in ROLES or any(c["type"] not in CONTENT_TYPES for c in m["content"]):
                    raise ValueError(f"bad role or content type in {m!r:.80}")
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise SkipSample("malformed_json", f"{key}: {e}") from None
        max_pixels = self.max_pixels
        if "video" in conv:
            try:
                v = conv["video"]
                frames, times = list(v["frames"]), [float(t) for t in v["timestamps"]]
                if len(frames) != len(times) or not frames:
                    raise ValueError("frames and timestamps differ in length or are empty")
            except (KeyError, TypeError, ValueError) as e:
                raise SkipSample("malformed_json", f"{key}: video: {e}") from None
            o = self.video
            keep = sample_frames(times, o.fps, o.min_duration, o.min_frames, o.max_duration)
            messages = expand_video(conv, [frames[i] for i in keep], [times[i] for i in keep], o.caption_prompt)
            max_pixels = min(max_pixels, o.frame_max_pixels)
        answers = [c.get("text", "") for m in messages if m["role"] == "assistant" for c in m["content"] if c["type"] == "text"]
        if not any(a.strip() for a in answers):
            raise SkipSample("empty_answer", key)
        if messages[-1]["role"] == "assistant" and not "".join(
                c.get("text", "") for c in messages[-1]["content"]).strip() and conv.get("video", {}).get("layout") != "caption":
            raise SkipSample("empty_answer", key)
        pixels, grids = [], []
        for m in messages:
            for c in m["content"]:
                if c["type"] != "image":
                    continue
                data = self._file(raw, str(c.get("ref")))
                if data is None:
                    raise SkipSample("missing_image", f"{key}: no file for image {c.get('ref')!r}")
                try:
                    pv, grid = patchify(decode_image(data, max_pixels), max_pixels, self.min_pixels)
                except ImageError as e:
                    raise SkipSample("corrupt_image", f"{key}: {e}") from None
                pixels.append(pv)
                grids.append(grid)
        enc = self.template.encode(messages)
        meta = {"key": key, "task": conv.get("task", "unknown"), "group": conv.get("group", "unknown"),
                "answer": enc.answer, "prompt_len": enc.prompt_len}
        return Sample(enc.input_ids, enc.answer_mask, enc.image_positions, pixels, grids, meta)


def _slot(skip_batches: int = 0) -> tuple[int, int, int]:
    """-> (slot, number of slots, batches to skip) of this reader: rank-major, then worker.

    The DataLoader serves workers round-robin starting with worker 0, so batch i of a run
    comes from worker i % nw. After consuming C batches, resumed output j must be original
    batch C + j: worker w therefore continues the stream of original worker (C + w) % nw,
    from that stream's batch (C + w) // nw."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    original = (wid + skip_batches) % nw
    return rank * nw + original, world * nw, (skip_batches + wid) // nw


class ShardStream(IterableDataset):
    """Packed batches from shards.

    Args:
        urls: shard paths (already expanded).
        processor: raw sample -> Sample.
        packer: dict of `Packer` arguments.
        rows_per_batch: rows collated into one batch.
        shuffle: shuffle shard order and samples (seeded per epoch); off for validation.
        repeat: loop over epochs forever (training) or stop after one pass.
        seed: base seed.
        shuffle_buffer: samples in the shuffle buffer.
        skip_batches: batches to fast-forward (resume); set by the DataModule.
    """

    def __init__(self, urls: list[str], processor: SampleProcessor, packer: dict[str, Any], rows_per_batch: int = 1,
                 shuffle: bool = True, repeat: bool = True, seed: int = 0, shuffle_buffer: int = 256,
                 skip_batches: int = 0):
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        self.urls, self.processor, self.packer_args = list(urls), processor, dict(packer)
        self.rows_per_batch, self.shuffle, self.repeat = rows_per_batch, shuffle, repeat
        self.seed, self.shuffle_buffer, self.skip_batches = seed, shuffle_buffer, skip_batches
        self.counts: Counter = Counter()
        self.last_packer: Packer | None = None

    # ------------------------------------------------------------------ samples
    def _raw_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 7919 + epoch).shuffle(urls)
        by_shard = len(urls) >= slots
        mine = urls[slot::slots] if by_shard else urls
        index = 0
        for url in mine:
            n = 0
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
            except Exception as e:  # a truncated or unreadable tar: count it, keep streaming
                self.counts["corrupt_shard"] += 1
                log.warning("skipping the rest of shard %s: %s", url, e)
            if n == 0:
                self.counts["empty_shard"] += 1
                log.warning("shard %s holds no samples", url)

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
        rng = random.Random(self.seed * 104729 + epoch * 131 + slot)
        for raw in self._shuffled(self._raw_samples(epoch, slot, slots), rng):
            try:
                s = self.processor(raw)
            except SkipSample as e:
                self.counts[e.reason] += 1
                log.warning("skipped sample (%s)", e)
                continue
            self.counts["samples_kept"] += 1
            yield s

    # ------------------------------------------------------------------ batches
    def batches(self, slot: int = 0, slots: int = 1) -> Iterator[PackedBatch]:
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
            self.counts["oversize"] += packer.stats.oversize
            for k in packer.oversize_keys:
                log.warning("skipped sample (oversize: %s)", k)
            if rows:
                yield collate_packed(rows)
            epoch += 1
            if not self.repeat:
                return
            if not produced:
                raise RuntimeError(f"no usable sample in {len(self.urls)} shard(s) for reader slot {slot}/{slots}: "
                                   f"skipped {dict(self.counts)}")

    def __iter__(self) -> Iterator[PackedBatch]:
        slot, slots, skip = _slot(self.skip_batches)
        for i, b in enumerate(self.batches(slot, slots)):
            if i >= skip:
                yield b

    def stats(self) -> dict[str, Any]:
        return dict(self.counts)
