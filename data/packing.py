"""Multimodal sequence packing: encoded samples -> rows under a text cap and an image cap.

Packing is greedy with a small look-ahead buffer (paper §3.3: 2048 text and 20,480 image
tokens per row): the open row takes the oldest pending sample that still fits both caps;
when none fits, the row is closed. A sample that cannot fit an empty row is skipped and
counted (`oversize`) -- never truncated, since a cut could split a window from its image
or drop the answer.

Windows are delimited by images (`casa.batch.window_boundaries`, the one rule:
consecutive images at the same text position share a window, text before a sample's first
image is a window without image, and every sample boundary is a window boundary). Example row of two samples (I = image token, t = text):

    sample 0:  t t [I I I I] t t t            sample 1: [I I] t t [I I I] t
    text idx   0 1           2 3 4                      5 6       7
    windows    (t t | -)(t t t | IIII)                  (t t | II)(t | III)
    window_cu_seqlens_text   [0, 2, 5, 7, 8]
    window_cu_seqlens_image  [0, 0, 4, 6, 9]
    sample_cu_seqlens        [0, 5, 8]
    image_text_position      [2, 5, 7]
    position_ids             [0 1 2 3 4 | 0 1 2]

Labels are pre-shifted: labels[p] = input_ids[p+1] when token p+1 is an answer target of
the same sample, else -100 (so no loss crosses a sample boundary; a sample's last token
has no target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator


from casa.batch import PackedBatch, collate_packed
from casa.processing.sample import Sample, build_sample_row


def build_row(samples: list[Sample]) -> PackedBatch:
    """Concatenate samples into one PackedBatch row (boundaries offset, no padding)."""
    if not samples:
        raise ValueError("build_row needs at least one sample")
    return collate_packed([build_sample_row(s) for s in samples])


@dataclass
class PackStats:
    """Fill of the rows built so far; fill = used / cap, per row and on average."""

    rows: int = 0
    samples: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    oversize: int = 0
    row_text: list[int] = field(default_factory=list)
    row_image: list[int] = field(default_factory=list)

    def add_row(self, text: int, image: int, samples: int) -> None:
        self.rows += 1
        self.samples += samples
        self.text_tokens += text
        self.image_tokens += image
        self.row_text.append(text)
        self.row_image.append(image)

    def fill(self, max_text: int, max_image: int) -> tuple[float, float]:
        """-> (mean text fill, mean image fill) over the rows."""
        if not self.rows:
            return 0.0, 0.0
        return self.text_tokens / (self.rows * max_text), self.image_tokens / (self.rows * max(max_image, 1))


class Packer:
    """Greedy packing with a look-ahead buffer.

    Args:
        max_text_tokens: text cap per row (paper: 2048).
        max_image_tokens: image-token cap per row (paper: 20480).
        buffer_size: pending samples considered when filling a row (1 = plain greedy in order).
        max_samples_per_row: cap on samples per row (None: no cap; 1 = no packing).
    """

    def __init__(self, max_text_tokens: int = 2048, max_image_tokens: int = 20480, buffer_size: int = 64,
                 max_samples_per_row: int | None = None):
        if max_text_tokens < 1 or max_image_tokens < 0:
            raise ValueError(f"Packer caps must be positive: max_text_tokens={max_text_tokens}, "
                             f"max_image_tokens={max_image_tokens}")
        if buffer_size < 1:
            raise ValueError(f"Packer.buffer_size={buffer_size} must be >= 1")
        if max_samples_per_row is not None and max_samples_per_row < 1:
            raise ValueError(f"Packer.max_samples_per_row={max_samples_per_row} must be >= 1 or None")
        self.max_text, self.max_image = max_text_tokens, max_image_tokens
        self.buffer_size = buffer_size
        self.max_samples = max_samples_per_row
        self.stats = PackStats()
        self.oversize_keys: list[str] = []

    def fits_alone(self, s: Sample) -> bool:
        return s.num_text <= self.max_text and s.num_image_tokens <= self.max_image

    def plan(self, samples: Iterable[Sample]) -> Iterator[list[Sample]]:
        """Samples -> groups of samples, one per row (pure apart from the statistics)."""
        pending: list[Sample] = []
        it = iter(samples)
        exhausted = False

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < self.buffer_size:
                s = next(it, None)
                if s is None:
                    exhausted = True
                elif self.fits_alone(s):
                    pending.append(s)
                else:
                    self.stats.oversize += 1
                    self.oversize_keys.append(str(s.meta.get("key")))

        while True:
            refill()
            if not pending:
                return
            row: list[Sample] = []
            t_used = i_used = 0
            i = 0
            while i < len(pending):
                s = pending[i]
                if t_used + s.num_text <= self.max_text and i_used + s.num_image_tokens <= self.max_image:
                    row.append(pending.pop(i))
                    t_used += s.num_text
                    i_used += s.num_image_tokens
                    if self.max_samples and len(row) >= self.max_samples:
                        break
                    refill()  # keep the look-ahead full while the row is open; earlier
                    # pending samples still do not fit, so the scan goes on from i
                else:
                    i += 1
            self.stats.add_row(t_used, i_used, len(row))
            yield row

    def pack(self, samples: Iterable[Sample]) -> Iterator[PackedBatch]:
        """Samples -> PackedBatch rows (see module doc)."""
        for group in self.plan(samples):
            yield build_row(group)
