"""PackedBatch: the fusion-agnostic batch every strategy consumes.

Shape glossary (used across `casa/`, `data/`, `callbacks/`):
    T  text tokens in the batch (all rows concatenated)
    N  image tokens in the batch (after the vision encoder's 2x2 merge)
    P  vision patches in the batch (before the merge; N = P / merge**2)
    I  images (a video frame is an image)
    W  windows (a window starts at an image, or a run of consecutive images, and runs to
       the next image or the end of the sample; text before a sample's first image forms
       a window with no image)
    S  samples (conversations)
    H  heads, Hkv key/value heads, D head dim, d model dim, V vocabulary

A batch is one flat stream: several packed rows are concatenated, which is the same as
one longer row because self-attention is block-diagonal over samples and fusion
attention is block-diagonal over windows. There is no padding anywhere.

Example: two samples, the first with one image, the second with two images separated
by text (image tokens shown as I, text as t):

    sample 0:  t t [I I I I] t t t                 windows: (t t | -) (t t t | IIII)
    sample 1:  [I I] t t [I I I] t                 windows: (t t | II) (t | III)

    input_ids               [t t t t t | t t t]    T = 8
    sample_cu_seqlens       [0, 5, 8]
    window_cu_seqlens_text  [0, 2, 5, 7, 8]        W = 4
    window_cu_seqlens_image [0, 0, 4, 6, 9]        N = 9
    image_text_position     [2, 5, 7]              text index each image precedes

Windows never cross a sample boundary, and every sample boundary is a window boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    """[T] int64 text token ids (no image placeholder tokens)."""
    labels: torch.Tensor
    """[T] int64 target for the logits at the same position: the next token of the same
    sample, already shifted, and -100 everywhere except assistant answers (and their
    end-of-turn token). Pre-shifted so that no loss crosses a sample boundary."""
    position_ids: torch.Tensor
    """[T] (1-D RoPE) or [3, T] (M-RoPE) int64 text positions, restarting at 0 for each
    sample. Images take no positions here: a strategy that inserts image tokens
    recomputes positions for its merged stream."""
    sample_cu_seqlens: torch.Tensor
    """[S+1] int32 sample boundaries in the text stream."""
    window_cu_seqlens_text: torch.Tensor
    """[W+1] int32 window boundaries in the text stream."""
    window_cu_seqlens_image: torch.Tensor
    """[W+1] int32 window boundaries in the image-token stream (equal entries for a window
    with no image)."""
    pixel_values: torch.Tensor
    """[P, C*temporal_patch*patch*patch] float Qwen2.5-VL flattened patches of every image,
    in stream order."""
    image_grid_thw: torch.Tensor
    """[I, 3] int64 (t, h, w) patch grid of every image; image i has t*h*w/merge**2 tokens."""
    image_text_position: torch.Tensor
    """[I] int64 text index each image precedes (T for an image at the very end)."""
    meta: list[dict[str, Any]] = field(default_factory=list)
    """[S] per-sample metadata: at least `key`, `task`, `group`; evaluation batches also
    carry `answer` (reference text) and `prompt_len` (text tokens before the answer)."""

    # ------------------------------------------------------------------ helpers
    @property
    def num_text_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_samples(self) -> int:
        return int(self.sample_cu_seqlens.numel() - 1)

    @property
    def num_windows(self) -> int:
        return int(self.window_cu_seqlens_text.numel() - 1)

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    @property
    def num_image_tokens(self) -> int:
        return int(self.window_cu_seqlens_image[-1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def validate(self) -> None:
        """Raise ValueError with the offending field if the batch is inconsistent."""
        T = self.num_text_tokens
        checks = [
            ("labels", self.labels.shape == self.input_ids.shape),
            ("position_ids", self.position_ids.shape[-1] == T),
            ("sample_cu_seqlens", int(self.sample_cu_seqlens[0]) == 0 and int(self.sample_cu_seqlens[-1]) == T),
            ("window_cu_seqlens_text", int(self.window_cu_seqlens_text[0]) == 0 and int(self.window_cu_seqlens_text[-1]) == T),
            ("window_cu_seqlens_image", self.window_cu_seqlens_image.shape == self.window_cu_seqlens_text.shape),
            ("image_text_position", self.image_text_position.shape[0] == self.image_grid_thw.shape[0]),
            ("meta", len(self.meta) in (0, self.num_samples)),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"PackedBatch.{name} is inconsistent with the rest of the batch")
        if self.window_cu_seqlens_text.numel() > 1:
            if (self.window_cu_seqlens_text.diff() < 0).any() or (self.window_cu_seqlens_image.diff() < 0).any():
                raise ValueError("PackedBatch window boundaries must be non-decreasing")
        sample_edges = set(self.sample_cu_seqlens.tolist())
        if not sample_edges.issubset(set(self.window_cu_seqlens_text.tolist())):
            raise ValueError("PackedBatch: every sample boundary must also be a window boundary")


def _offset(cu: torch.Tensor, by: int) -> torch.Tensor:
    return cu[1:] + by


def collate_packed(rows: list[PackedBatch]) -> PackedBatch:
    """Concatenate packed rows into one flat batch (boundaries offset, no padding)."""
    if len(rows) == 1:
        return rows[0]
    t_off = 0
    n_off = 0
    sample_cu = [rows[0].sample_cu_seqlens[:1]]
    win_t = [rows[0].window_cu_seqlens_text[:1]]
    win_i = [rows[0].window_cu_seqlens_image[:1]]
    img_pos = []
    for r in rows:
        sample_cu.append(_offset(r.sample_cu_seqlens, t_off))
        win_t.append(_offset(r.window_cu_seqlens_text, t_off))
        win_i.append(_offset(r.window_cu_seqlens_image, n_off))
        img_pos.append(r.image_text_position + t_off)
        t_off += r.num_text_tokens
        n_off += r.num_image_tokens
    return PackedBatch(
        input_ids=torch.cat([r.input_ids for r in rows]),
        labels=torch.cat([r.labels for r in rows]),
        position_ids=torch.cat([r.position_ids for r in rows], dim=-1),
        sample_cu_seqlens=torch.cat(sample_cu),
        window_cu_seqlens_text=torch.cat(win_t),
        window_cu_seqlens_image=torch.cat(win_i),
        pixel_values=torch.cat([r.pixel_values for r in rows]),
        image_grid_thw=torch.cat([r.image_grid_thw for r in rows]),
        image_text_position=torch.cat(img_pos),
        meta=[m for r in rows for m in r.meta],
    )
