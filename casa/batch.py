"""PackedBatch: the fusion-agnostic batch every strategy consumes.

Shape glossary (used across `casa/`, `data/`, `callbacks/`):
    T  text tokens in the batch (all rows concatenated)
    N  image tokens in the batch (after the vision encoder's 2x2 merge)
    P  vision patches in the batch (before the merge; N = P / merge**2)
    I  images (a video frame is an image)
    W  windows (`window_boundaries`: a window starts at an image, or a run of consecutive images, and runs to
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

from dataclasses import astuple, dataclass, field, fields, replace
from functools import reduce
from typing import Any

import torch


@dataclass(frozen=True)
class SeqLens:
    """Longest segments of a batch, as host ints: what flash-attn's `max_seqlen_q/k` need.
    Computed where the batch is built, from host lists or CPU tensors (`seqlens_of`), so
    attention never reads them back from the device: one `.tolist()` per fused layer per
    step (and again under activation checkpointing) was a host sync each."""

    sample_text: int
    """Text tokens of the longest sample (self-attention of the windowed strategies)."""
    sample_all: int
    """Text + image tokens of the longest sample (self-attention over insertion's merged stream)."""
    window_text: int
    """Text tokens of the longest window (CA / CASA queries)."""
    window_image: int
    """Image tokens of the window with the most (CA keys)."""
    window_all: int
    """Image + text tokens of the longest window (CASA keys, `[image_w | text_w]`)."""

    def max(self, other: "SeqLens") -> "SeqLens":
        return SeqLens(*(max(a, b) for a, b in zip(astuple(self), astuple(other))))


def seqlens_of(sample_cu: list[int], window_cu_text: list[int], window_cu_image: list[int]) -> SeqLens:
    """Host boundary lists [S+1], [W+1], [W+1] -> SeqLens (pure). Every sample boundary is a
    window boundary, so a sample's image tokens are read at its first and last window."""
    lt = [b - a for a, b in zip(window_cu_text, window_cu_text[1:])]
    li = [b - a for a, b in zip(window_cu_image, window_cu_image[1:])]
    first = {}
    for w, t in enumerate(window_cu_text):
        first.setdefault(t, w)
    sample_all = max((b - a + window_cu_image[first[b]] - window_cu_image[first[a]]
                      for a, b in zip(sample_cu, sample_cu[1:])), default=0)
    return SeqLens(sample_text=max((b - a for a, b in zip(sample_cu, sample_cu[1:])), default=0),
                   sample_all=sample_all, window_text=max(lt, default=0), window_image=max(li, default=0),
                   window_all=max((a + b for a, b in zip(lt, li)), default=0))


def image_token_count(grid_thw, merge: int):
    """Tokens of each image after the vision encoder's merge x merge spatial merge: t*h*w / merge**2.

    grid_thw: [I, 3] int tensor of (t, h, w) patch grids -> [I] int64 tensor (same device);
    or a sequence of (t, h, w) int triples -> list[int] (host, no device read)."""
    if isinstance(grid_thw, torch.Tensor):
        return (grid_thw.reshape(-1, 3).prod(-1) // (merge * merge)).long()
    return [int(t) * int(h) * int(w) // (merge * merge) for t, h, w in grid_thw]


def _host(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def window_boundaries(sample_cu_seqlens, image_text_position, image_token_counts) -> tuple[list[int], list[int]]:
    """The CASA window rule (pure, host lists or tensors in, host lists out):
    sample boundaries [S+1], text index each image precedes [I] (sorted), tokens per image [I]
    -> (window_cu_seqlens_text [W+1], window_cu_seqlens_image [W+1]).

    Every sample opens a window at its first text token; each image at a text index past
    the current window's start opens a new window there (consecutive images, at the same
    index, share one); the text of a sample before its first image is a window without
    image (none when the sample starts with an image). So windows never cross a sample
    boundary and every sample boundary is a window boundary. An image precedes the text
    of the sample holding its index; one at index T (after all the text) belongs to the
    last sample and ends it with a window without text.

        sample 0:  t t [I I I I] t t t         sample 1: [I I] t t [I I I] t
        text idx   0 1           2 3 4                   5 6       7
        sample_cu_seqlens [0, 5, 8]   image_text_position [2, 5, 7]   tokens [4, 2, 3]
        windows    (t t | -) (t t t | IIII)              (t t | II) (t | III)
        -> window_cu_seqlens_text  [0, 2, 5, 7, 8]
           window_cu_seqlens_image [0, 0, 4, 6, 9]
    """
    sample_cu, pos, counts = _host(sample_cu_seqlens), _host(image_text_position), _host(image_token_counts)
    if len(pos) != len(counts):
        raise ValueError(f"window_boundaries: {len(pos)} image positions but {len(counts)} image token counts")
    cu_t, cu_i = [], []
    seen = i = 0
    S = len(sample_cu) - 1
    for s in range(S):
        a, b = sample_cu[s], sample_cu[s + 1]
        cu_t.append(a)
        cu_i.append(seen)
        while i < len(pos) and (pos[i] < b or (s == S - 1 and pos[i] == b)):
            if pos[i] < a:
                raise ValueError(f"window_boundaries: image_text_position={pos} must be sorted "
                                 f"(image {i} at {pos[i]} comes before sample {s}'s start {a})")
            if pos[i] > cu_t[-1]:  # an image past the window's start opens a new window
                cu_t.append(pos[i])
                cu_i.append(seen)
            seen += counts[i]
            i += 1
    if i < len(pos):
        raise ValueError(f"window_boundaries: image {i} at text index {pos[i]} is past the text "
                         f"(T={sample_cu[-1]}, sample_cu_seqlens={sample_cu})")
    cu_t.append(sample_cu[-1] if sample_cu else 0)
    cu_i.append(seen)
    return cu_t, cu_i


def window_samples(sample_cu_seqlens, window_cu_seqlens_text) -> tuple[list[int], list[bool]]:
    """-> (sample of each window [W], whether it is its sample's first window [W]), host lists.
    A window belongs to the sample its text starts in (every sample boundary is a window
    boundary, `window_boundaries`)."""
    sample_cu, cu_t = _host(sample_cu_seqlens), _host(window_cu_seqlens_text)
    owner, first = [], []
    s = 0
    for w in range(len(cu_t) - 1):
        while s + 1 < len(sample_cu) - 1 and sample_cu[s + 1] <= cu_t[w]:
            s += 1
        first.append(not owner or owner[-1] != s)
        owner.append(s)
    return owner, first


def continues_open_window(sample_cu_seqlens, window_cu_seqlens_text, window_cu_seqlens_image) -> list[bool]:
    """For a chunk that continues cached samples: [W] whether window w continues its
    sample's open (cached) window rather than opening a new one. By the rule of
    `window_boundaries` a window is opened by an image, so the one that continues is a
    sample's first window of the chunk when it holds no image (the text before the
    chunk's first image)."""
    cu_i = _host(window_cu_seqlens_image)
    _, first = window_samples(sample_cu_seqlens, window_cu_seqlens_text)
    return [f and cu_i[w] == cu_i[w + 1] for w, f in enumerate(first)]


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
    seqlens: SeqLens | None = None
    """Longest sample and window as host ints (`build_batch` fills it in, `collate_packed`
    combines the rows'); None when unknown: attention then reads the boundaries."""

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

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> "PackedBatch":
        """Every tensor to `device`. non_blocking None: asynchronous exactly when it is safe,
        for a pinned source (`pin_memory`) going to CUDA; a copy from pageable memory blocks
        the host whatever the flag says."""
        device = torch.device(device)
        moved = {}
        for name, t in self._tensors().items():
            nb = (t.is_pinned() and device.type == "cuda") if non_blocking is None else non_blocking
            moved[name] = t.to(device, non_blocking=nb)
        return replace(self, **moved)

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copies of the tensors: the DataLoader calls this (`pin_memory=True`) in
        its pinning thread, so the host-to-GPU copy of `to` can run asynchronously."""
        return replace(self, **{name: t.pin_memory() for name, t in self._tensors().items()})

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
        if self.seqlens is not None:
            want = seqlens_of(self.sample_cu_seqlens.tolist(), self.window_cu_seqlens_text.tolist(),
                              self.window_cu_seqlens_image.tolist())
            if self.seqlens != want:
                raise ValueError(f"PackedBatch.seqlens={self.seqlens} disagrees with the boundaries ({want})")


def build_batch(input_ids, sample_cu_seqlens, *, pixel_values: torch.Tensor, image_grid_thw, image_text_position,
                merge: int, labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                meta: list[dict[str, Any]] | None = None) -> PackedBatch:
    """The one way to make a PackedBatch (`collate_packed` concatenates batches made here):
    the windows come from `window_boundaries`, the host max lengths from `seqlens_of`.

    input_ids [T] (tensor or list; its device, else pixel_values', is the batch's);
    sample_cu_seqlens [S+1], image_grid_thw [I, 3], image_text_position [I]: host lists or
    tensors (tensors are read back once, here; give host lists on a hot path);
    pixel_values [P, C*tp*p*p]; merge: the vision encoder's spatial merge (image tokens
    `image_token_count(image_grid_thw, merge)`); labels [T] (default: no target, -100);
    position_ids [T] or [3, T] (default: 0..n-1 within each sample); meta [S] or None."""
    dev = input_ids.device if isinstance(input_ids, torch.Tensor) else pixel_values.device
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long, device=dev)
    sample_cu = _host(sample_cu_seqlens)
    grids = [list(g) for g in _host(image_grid_thw)]
    img_pos = _host(image_text_position)
    win_t, win_i = window_boundaries(sample_cu, img_pos, image_token_count(grids, merge))

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=dev)

    if position_ids is None:
        position_ids = torch.cat([torch.arange(b - a, device=dev) for a, b in zip(sample_cu, sample_cu[1:])]
                                 or [torch.zeros(0, dtype=torch.long, device=dev)])
    if isinstance(sample_cu_seqlens, torch.Tensor) and sample_cu_seqlens.dtype == torch.int32:
        sample_cu_t = sample_cu_seqlens.to(dev)
    else:
        sample_cu_t = i32(sample_cu)
    return PackedBatch(
        input_ids=ids,
        labels=labels if labels is not None else torch.full_like(ids, -100),
        position_ids=position_ids,
        sample_cu_seqlens=sample_cu_t,
        window_cu_seqlens_text=i32(win_t),
        window_cu_seqlens_image=i32(win_i),
        pixel_values=pixel_values,
        image_grid_thw=(image_grid_thw if isinstance(image_grid_thw, torch.Tensor)
                        else torch.tensor(grids, dtype=torch.long, device=dev)).reshape(-1, 3),
        image_text_position=(image_text_position if isinstance(image_text_position, torch.Tensor)
                             else torch.tensor(img_pos, dtype=torch.long, device=dev)),
        meta=list(meta) if meta is not None else [],
        seqlens=seqlens_of(sample_cu, win_t, win_i),
    )


def _offset(cu: torch.Tensor, by: int) -> torch.Tensor:
    return cu[1:] + by


def collate_packed(rows: list[PackedBatch]) -> PackedBatch:
    """Concatenate packed rows into one flat batch (boundaries offset, no padding).
    The rows come from `build_batch`, and the window rule is per sample, so the windows of
    the concatenation are the rows' windows offset: what `window_boundaries` gives on the
    concatenated samples (tests/test_window_rule.py), without reading the rows back.
    `seqlens` is the rows' (computed for a row on the CPU that lacks it), or None if a
    row on another device lacks it."""
    lens = [r.seqlens if r.seqlens is not None or r.sample_cu_seqlens.device.type != "cpu"
            else seqlens_of(r.sample_cu_seqlens.tolist(), r.window_cu_seqlens_text.tolist(),
                            r.window_cu_seqlens_image.tolist()) for r in rows]
    seqlens = None if any(x is None for x in lens) else reduce(SeqLens.max, lens)
    if len(rows) == 1:
        return replace(rows[0], seqlens=seqlens)
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
        seqlens=seqlens,
    )
