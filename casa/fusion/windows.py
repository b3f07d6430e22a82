"""The window index (`casa.context.WindowIndex`): what CA and CASA layers need about a
batch, built here once per forward and shared by every fused layer.

CASA (paper eq. 3): the text queries of window w attend causally to the window's image
tokens followed by the window's own text tokens. The keys of each window are laid out as
`[image_w | text_w]`, so the primitive's bottom-right causal mask does exactly that:

    window w: 3 image tokens (I), 4 text tokens (t); Lq = 4, Lk = 7
                    keys  I I I t t t t
        query t0          x x x x . . .
        query t1          x x x x x . .
        query t2          x x x x x x .
        query t3          x x x x x x x

CA: the same queries attend to the window's image tokens only, not causally; a window
without image tokens gives zeros (the `1[i > K]` of DESIGN.md's equation).

`kv_rows` says where each key lands in that layout: image token n of window w goes to
row `n + window_cu_text[w]`, text token p of window w to `p + window_cu_image[w + 1]`;
`window_layout` writes both there (one row copy each way, forward and backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from casa.batch import image_token_count
from casa.context import StreamContext, WindowIndex
from casa.fusion.base import FusionStrategy
from casa.positions import window_image_positions

KINDS = ("casa", "cross_attention")
INFERENCE_MASKS = ("self", "rnd", "rnd_txt")


def window_of(cu: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Window of each element: index [K] -> [K]. Empty windows are skipped correctly
    because `right=True` picks the last window starting at or before the element."""
    return torch.searchsorted(cu.long(), index, right=True) - 1


def casa_kv_rows(window_cu_text: torch.Tensor, window_cu_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[W+1], [W+1] -> (image rows [N], text rows [T]): where each image and text key goes
    in the per-window [image_w | text_w] layout of N + T rows."""
    cu_t, cu_i = window_cu_text.long(), window_cu_image.long()
    N, T = int(cu_i[-1]), int(cu_t[-1])
    n = torch.arange(N, device=cu_t.device)
    p = torch.arange(T, device=cu_t.device)
    return n + cu_t[window_of(cu_i, n)], p + cu_i[window_of(cu_t, p) + 1]


class _WindowLayout(torch.autograd.Function):
    """Rows of a [N, ...] and b [T, ...] placed at rows_a / rows_b of one [N + T, ...]
    tensor. Autograd's cat + gather did the same with two copies forward and a zero fill
    plus a scatter backward (`index_put`, 2.5% of a CASA layer's training step)."""

    @staticmethod
    def forward(ctx, a, b, rows_a, rows_b):
        out = a.new_empty(a.shape[0] + b.shape[0], *a.shape[1:])
        out.index_copy_(0, rows_a, a)
        out.index_copy_(0, rows_b, b)
        ctx.save_for_backward(rows_a, rows_b)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows_a, rows_b = ctx.saved_tensors
        ga = grad.index_select(0, rows_a) if ctx.needs_input_grad[0] else None
        gb = grad.index_select(0, rows_b) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None


def window_layout(image: torch.Tensor, text: torch.Tensor, index: WindowIndex) -> torch.Tensor:
    """image [N, ...], text [T, ...] -> [N + T, ...] in the per-window [image_w | text_w]
    layout of a CASA index."""
    return _WindowLayout.apply(image, text, *index.kv_rows)


def build_window_index(kind: str, window_cu_text: torch.Tensor, window_cu_image: torch.Tensor,
                       image_cos: torch.Tensor, image_sin: torch.Tensor, seqlens=None) -> WindowIndex:
    """seqlens: the batch's `casa.batch.SeqLens` (host maxima), or None."""
    if kind not in KINDS:
        raise ValueError(f"window index kind={kind!r} is not one of {list(KINDS)}")
    max_q = None if seqlens is None else seqlens.window_text
    if kind == "casa":
        return WindowIndex(kind, window_cu_text, (window_cu_text + window_cu_image).to(torch.int32), True,
                           casa_kv_rows(window_cu_text, window_cu_image), image_cos, image_sin, window_cu_image,
                           max_q=max_q, max_k=None if seqlens is None else seqlens.window_all)
    return WindowIndex(kind, window_cu_text, window_cu_image, False, None, image_cos, image_sin, window_cu_image,
                       max_q=max_q, max_k=None if seqlens is None else seqlens.window_image)


def table8_masked_key(index: WindowIndex, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The key each query may not see in a CASA layer (paper Table 8) -> [T] int64, -1 = none.

    self:    the query's own key;
    rnd:     a random *past* key of the window, image or text (never itself);
    rnd_txt: a random past text key of the window (never itself).
    A query with no candidate (e.g. the first text token for `rnd_txt`) masks nothing.
    """
    if mode not in INFERENCE_MASKS:
        raise ValueError(f"inference_mask={mode!r} is not one of {list(INFERENCE_MASKS)} (or None)")
    if index.kind != "casa":
        raise ValueError("Table 8 masks apply to CASA layers only")
    cu_t, cu_i = index.cu_q.long(), index.window_cu_image.long()
    T = int(cu_t[-1])
    p = torch.arange(T, device=cu_t.device)
    w = window_of(cu_t, p)
    key_start = cu_t[w] + cu_i[w]  # first key of the window in the [image | text] layout
    n_img = cu_i[w + 1] - cu_i[w]
    self_key = p + cu_i[w + 1]
    if mode == "self":
        return self_key
    lo = key_start if mode == "rnd" else key_start + n_img
    num = self_key - lo  # candidates in [lo, self_key)
    u = torch.rand(T, generator=generator, device=cu_t.device)
    pick = lo + (u * num.clamp(min=1)).long().clamp(max=(num - 1).clamp(min=0))
    return torch.where(num > 0, pick, torch.full_like(pick, -1))


class WindowedFusion(FusionStrategy):
    """The windowed strategies (CA, gated CA, CASA, the Perceiver): the stream is the text
    alone; the image tokens (compressed first if the strategy compresses, `compress`) are kept
    aside, each window's text attending to its window's image tokens through the blocks'
    fusion layers, with one window index (`kind`) built per forward and shared by them all.

    Subclasses set `kind` and compose the blocks in `attach`. Two hooks change what windows
    see, one method each: `window_images` (which image tokens each window's queries attend
    to: a CASA variant with another window rule overrides it) and `masked_key`."""

    kind = "cross_attention"
    """Which window index the fusion layers read: one of `KINDS`."""

    def window_images(self, batch, images: torch.Tensor,
                      compressed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image tokens of every window, in window order, and their RoPE positions.

        batch: the `PackedBatch`; images [N', d] (after `compress`); compressed: counts' [I]
        from `compress`, or None (uncompressed) -> (images [K, d], positions [K] or [3, K]
        under M-RoPE, window_cu_image [W+1] int32: window w attends to rows
        window_cu_image[w]:window_cu_image[w+1]).

        The window rule's windows (`casa.batch.window_boundaries`): each window attends to the
        images that opened it, placed (`casa.positions.window_image_positions`) just before its
        first text token. Compressed images keep their windows, with counts' tokens each."""
        cu_i = batch.window_cu_seqlens_image
        if compressed is not None:
            counts = image_token_count(batch.image_grid_thw, self.merge)  # [I] before compression
            win = window_of(cu_i, counts.cumsum(0) - counts)  # [I] window of each image
            W = batch.window_cu_seqlens_text.numel() - 1
            per_window = torch.zeros(W, dtype=torch.long, device=cu_i.device).index_add_(0, win, compressed.long())
            cu_i = F.pad(per_window.cumsum(0), (1, 0)).to(torch.int32)
        positions = window_image_positions(batch.position_ids, batch.window_cu_seqlens_text,
                                           batch.window_cu_seqlens_image, batch.image_grid_thw, self.merge,
                                           self.mrope, compressed)
        return images, positions, cu_i

    def masked_key(self, index: WindowIndex) -> torch.Tensor | None:
        """[T] int64 key each query may not see (-1 = none), or None (CASA's Table 8 masks)."""
        return None

    def prepare(self, batch, text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                backbone) -> tuple[torch.Tensor, torch.Tensor, StreamContext]:
        """-> (stream [T, d] the text, images [K, d], StreamContext with the window index)."""
        dtype = text_embeds.dtype
        cos, sin = backbone.rope(batch.position_ids, dtype)  # [T, D]
        images, compressed = self.compress(image_embeds, image_token_count(batch.image_grid_thw, self.merge))
        images, img_pos, cu_i = self.window_images(batch, images, compressed)
        icos, isin = backbone.rope(img_pos, dtype)  # [K, D]
        lens = batch.seqlens
        index = build_window_index(self.kind, batch.window_cu_seqlens_text, cu_i, icos, isin, lens)
        if cu_i is not batch.window_cu_seqlens_image:
            # not the batch's windows: a bound from the fixed-size compression, if there is one
            bound = self.compressed_bound(batch.num_images)
            index.max_k = None if lens is None or bound is None else \
                bound + (lens.window_text if self.kind == "casa" else 0)
        index.masked_key = self.masked_key(index)
        ctx = StreamContext(batch.sample_cu_seqlens, cos, sin, windows=index,
                            max_seqlen=None if lens is None else lens.sample_text)
        return text_embeds, images.to(dtype), ctx
