"""Multimodal sequence packing: encoded samples -> rows under a text cap and an image cap.

Packing is greedy with a small look-ahead buffer: the row takes the oldest pending sample
that still fits both caps; when none fits, the row is closed. A sample that cannot fit an
empty row is skipped and counted (`oversize`) -- never truncated, since a cut could split
a window from its image or drop the answer.

Windows are delimited by images. Example row of two samples (I = image token, t = text):

    sample 0:  t t [I I I I] t t t            sample 1: [I I] t t [I I I] t
    text       0 1           2 3 4                      5 6       7
    windows    (t t | -) (t t t | IIII)                 (t t | II) (t | III)
    window_cu_seqlens_text   [0, 2, 5, 7, 8]
    window_cu_seqlens_image  [0, 0, 4, 6, 9]
    sample_cu_seqlens        [0, 5, 8]

Labels are pre-shifted: labels[p] = input_ids[p+1] when token p+1 is an answer target of
the same sample, else -100 (so no loss crosses a sample boundary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from casa.batch import PackedBatch, collate_packed

PATCH_DIM = 3 * 2 * 14 * 14


@dataclass
class Sample:
    """A tokenised sample ready to pack."""

    input_ids: list[int]
    answer_mask: list[bool]
    image_positions: list[int]
    pixel_values: list[torch.Tensor]
    """Per image [P_i, PATCH_DIM]."""
    grids: list[list[int]]
    """Per image (t, h, w)."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_text(self) -> int:
        return len(self.input_ids)

    @property
    def num_image_tokens(self) -> int:
        return sum(t * h * w // 4 for t, h, w in self.grids)


def sample_windows(image_positions: list[int], image_tokens: list[int], num_text: int) -> tuple[list[int], list[int]]:
    """Window boundaries of one sample (pure): -> (cu_text [W+1], cu_image [W+1]).

    A window starts at each distinct image position (consecutive images share one); text
    before the first image forms a window without image."""
    cu_t, cu_i = [0], [0]
    seen = 0
    for pos, n in zip(image_positions, image_tokens):
        if pos > cu_t[-1]:  # a new window opens here
            cu_t.append(pos)
            cu_i.append(seen)
        seen += n
    cu_t.append(num_text)
    cu_i.append(seen)
    return cu_t, cu_i


def build_row(samples: list[Sample]) -> PackedBatch:
    """Concatenate samples into one PackedBatch row."""
    rows = []
    for s in samples:
        T = s.num_text
        if any(p >= T for p in s.image_positions):
            raise ValueError(f"sample {s.meta.get('key')}: an image has no text after it")
        ids = torch.tensor(s.input_ids, dtype=torch.long)
        target = torch.tensor(s.answer_mask, dtype=torch.bool)
        labels = torch.full((T,), -100, dtype=torch.long)
        labels[:-1] = torch.where(target[1:], ids[1:], labels[:-1])
        tokens = [t * h * w // 4 for t, h, w in s.grids]
        cu_t, cu_i = sample_windows(s.image_positions, tokens, T)
        rows.append(PackedBatch(
            input_ids=ids, labels=labels, position_ids=torch.arange(T),
            sample_cu_seqlens=torch.tensor([0, T], dtype=torch.int32),
            window_cu_seqlens_text=torch.tensor(cu_t, dtype=torch.int32),
            window_cu_seqlens_image=torch.tensor(cu_i, dtype=torch.int32),
            pixel_values=torch.cat(s.pixel_values) if s.pixel_values else torch.zeros(0, PATCH_DIM),
            image_grid_thw=torch.tensor(s.grids, dtype=torch.long).reshape(-1, 3),
            image_text_position=torch.tensor(s.image_positions, dtype=torch.long),
            meta=[dict(s.meta)],
        ))
    return collate_packed(rows) if len(rows) > 1 else rows[0]


@dataclass
class PackStats:
    rows: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    oversize: int = 0

    def fill(self, max_text: int, max_image: int) -> tuple[float, float]:
        if not self.rows:
            return 0.0, 0.0
        return self.text_tokens / (self.rows * max_text), self.image_tokens / (self.rows * max_image)


class Packer:
    """Greedy packing with a look-ahead buffer.

    Args:
        max_text_tokens: text cap per row (paper: 2048).
        max_image_tokens: image-token cap per row (paper: 20480).
        buffer_size: pending samples considered when filling a row.
        max_samples_per_row: cap on samples per row (1 = no packing, e.g. for evaluation).
    """

    def __init__(self, max_text_tokens: int = 2048, max_image_tokens: int = 20480, buffer_size: int = 64,
                 max_samples_per_row: int | None = None):
        if max_text_tokens < 1 or max_image_tokens < 0:
            raise ValueError(f"caps must be positive: max_text_tokens={max_text_tokens}, max_image_tokens={max_image_tokens}")
        self.max_text, self.max_image = max_text_tokens, max_image_tokens
        self.buffer_size = max(1, buffer_size)
        self.max_samples = max_samples_per_row
        self.stats = PackStats()
        self.oversize_keys: list[str] = []

    def fits_alone(self, s: Sample) -> bool:
        return s.num_text <= self.max_text and s.num_image_tokens <= self.max_image

    def pack(self, samples: Iterable[Sample]) -> Iterator[PackedBatch]:
        pending: list[Sample] = []
        it = iter(samples)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.buffer_size:
                try:
                    s = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if self.fits_alone(s):
                    pending.append(s)
                else:
                    self.stats.oversize += 1
                    self.oversize_keys.append(str(s.meta.get("key")))
            if not pending:
                return
            row, t_used, i_used = [], 0, 0
            i = 0
            while i < len(pending):
                s = pending[i]
                if t_used + s.num_text <= self.max_text and i_used + s.num_image_tokens <= self.max_image:
                    row.append(pending.pop(i))
                    t_used += s.num_text
                    i_used += s.num_image_tokens
                    if self.max_samples and len(row) >= self.max_samples:
                        break
                    # refill so the look-ahead stays full while the row is open
                    while not exhausted and len(pending) < self.buffer_size:
                        try:
                            nxt = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        if self.fits_alone(nxt):
                            pending.append(nxt)
                        else:
                            self.stats.oversize += 1
                            self.oversize_keys.append(str(nxt.meta.get("key")))
                else:
                    i += 1
            self.stats.rows += 1
            self.stats.text_tokens += t_used
            self.stats.image_tokens += i_used
            yield build_row(row)
