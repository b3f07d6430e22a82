"""One encoded conversation -> model inputs: the `Sample` a template and the image
preprocessing produce, and its single-sample `PackedBatch` row (`build_sample_row`).

Training (`data.packing.Packer` packs these rows), evaluation and inference
(`casa.assistant`) build their inputs here, so a sample is laid out the same way in all of
them. Labels are pre-shifted: labels[p] = input_ids[p+1] when token p+1 is an answer target,
else -100 (a sample's last token has no target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from casa.batch import PackedBatch, build_batch, image_token_count
from casa.processing.image import MERGE, PATCH_DIM


@dataclass
class Sample:
    """A tokenised sample ready to pack."""

    input_ids: list[int]
    """[T_s] text ids."""
    answer_mask: list[bool]
    """[T_s] True for answer targets."""
    image_positions: list[int]
    """[I_s] text index each image precedes (< T_s)."""
    pixel_values: list[torch.Tensor]
    """Per image [P_i, 3*2*14*14]."""
    grids: list[list[int]]
    """Per image (t, h, w) patch grid; image i has `image_token_count` tokens (t*h*w / MERGE**2)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """key, task, group, answer, prompt_len."""

    @property
    def num_text(self) -> int:
        return len(self.input_ids)

    @property
    def image_tokens(self) -> list[int]:
        return image_token_count(self.grids, MERGE)

    @property
    def num_image_tokens(self) -> int:
        return sum(self.image_tokens)


def shifted_labels(input_ids: list[int], answer_mask: list[bool]) -> torch.Tensor:
    """[T_s] -> [T_s] labels: labels[p] = ids[p+1] if token p+1 is a target, else -100."""
    ids = torch.tensor(input_ids, dtype=torch.long)
    target = torch.tensor(answer_mask, dtype=torch.bool)
    labels = torch.full_like(ids, -100)
    labels[:-1] = torch.where(target[1:], ids[1:], labels[:-1])
    return labels


def build_sample_row(s: Sample) -> PackedBatch:
    """One sample as a PackedBatch (S = 1)."""
    T = s.num_text
    if len(s.answer_mask) != T or len(s.image_positions) != len(s.grids) or len(s.pixel_values) != len(s.grids):
        raise ValueError(f"sample {s.meta.get('key')}: input_ids/answer_mask or images/grids/pixels disagree in length")
    if any(p >= T for p in s.image_positions) or list(s.image_positions) != sorted(s.image_positions):
        raise ValueError(f"sample {s.meta.get('key')}: image positions {s.image_positions} must be sorted and < T={T}"
                         " (an image needs text after it, or it would fall into the next sample)")
    return build_batch(  # windows by `casa.batch.window_boundaries`, host max lengths (`SeqLens`)
        torch.tensor(s.input_ids, dtype=torch.long), [0, T],
        labels=shifted_labels(s.input_ids, s.answer_mask),
        position_ids=torch.arange(T),  # 1-D; the model derives M-RoPE positions itself
        pixel_values=torch.cat(s.pixel_values) if s.pixel_values else torch.zeros(0, PATCH_DIM),
        image_grid_thw=[list(g) for g in s.grids], image_text_position=list(s.image_positions), merge=MERGE,
        meta=[dict(s.meta)],
    )
