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

Eq. 3's indicator 1[i > K] for CASA⊕/→ (`WindowedFusion.indicator`): a window that sees no
image token (the text of a sample before its first image) has no keys at all, so its queries
get no update and a text-only input runs exactly as the backbone. CASA∨ replaces SA, so its
text-only windows keep their (windowed) self-attention.

`kv_rows` says where each key lands in that layout: image token n of window w goes to
row `n + window_cu_text[w]`, text token p of window w to `p + window_cu_image[w + 1]`
(with the indicator, a window without image keeps no text key: the rows shift past it);
`window_layout` writes both there (one row copy each way, forward and backward).

The window rule: a window sees the images that opened it (`casa.batch.window_boundaries`).
A strategy with another rule overrides `WindowedFusion.visible_windows` (which earlier
windows of the sample it also sees the images of); the keys are then gathered window by
window (`kv_gather`), and the KV cache keeps what later windows still see (`casa.cache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from casa.batch import image_token_count, window_samples
from casa.context import StreamContext, WindowIndex
from casa.fusion.base import FusionStrategy
from casa.positions import window_image_positions

KINDS = ("casa", "cross_attention")
INFERENCE_MASKS = ("self", "rnd", "rnd_txt")


def window_of(cu: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Window of each element: index [K] -> [K]. Empty windows are skipped correctly
    because `right=True` picks the last window starting at or before the element."""
    return torch.searchsorted(cu.long(), index, right=True) - 1


def casa_kv_rows(window_cu_text: torch.Tensor, window_cu_image: torch.Tensor,
                 indicator: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int]]:
    """[W+1], [W+1] -> (cu_k [W+1] int32, (image rows [N], text rows [T], K keys)): the
    per-window [image_w | text_w] key layout and where each image and text key goes in it.

    indicator (eq. 3): a window without image has no key; its text tokens get row cu_k[-1],
    one past the layout (`window_layout` writes them nowhere)."""
    cu_t, cu_i = window_cu_text.long(), window_cu_image.long()
    n_img, n_txt = cu_i.diff(), cu_t.diff()  # [W]
    cu_k = cu_t + cu_i
    if indicator:
        cu_k = F.pad((n_img + torch.where(n_img > 0, n_txt, 0)).cumsum(0), (1, 0))  # [W+1]
    N, T, K = torch.stack([cu_i[-1], cu_t[-1], cu_k[-1]]).tolist()  # one host read
    n = torch.arange(N, device=cu_t.device)
    p = torch.arange(T, device=cu_t.device)
    w_img, w_txt = window_of(cu_i, n), window_of(cu_t, p)
    rows_txt = cu_k[w_txt] + n_img[w_txt] + p - cu_t[w_txt]
    if indicator:
        rows_txt = torch.where((n_img > 0)[w_txt], rows_txt, K)
    return cu_k.to(torch.int32), (cu_k[w_img] + n - cu_i[w_img], rows_txt, K)


class _WindowLayout(torch.autograd.Function):
    """Rows of a [N, ...] and b [T, ...] placed at rows_a / rows_b of one [L, ...] tensor
    (L = N + T, or fewer when some text rows are no key: row L, dropped). Autograd's cat +
    gather did the same with two copies forward and a zero fill plus a scatter backward
    (`index_put`, 2.5% of a CASA layer's training step)."""

    @staticmethod
    def forward(ctx, a, b, rows_a, rows_b, length: int):
        dropped = a.shape[0] + b.shape[0] - length  # text rows that are no key (eq. 3's indicator)
        out = a.new_empty(length + (dropped > 0), *a.shape[1:])  # a spare row takes the dropped ones
        out.index_copy_(0, rows_a, a)
        out.index_copy_(0, rows_b, b)
        ctx.save_for_backward(rows_a, rows_b)
        ctx.length, ctx.dropped = length, dropped
        return out[:length] if dropped else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows_a, rows_b = ctx.saved_tensors
        ga = grad.index_select(0, rows_a) if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.needs_input_grad[1]:
            if not ctx.dropped:
                gb = grad.index_select(0, rows_b)
            elif ctx.length == 0:
                gb = grad.new_zeros(rows_b.shape[0], *grad.shape[1:])
            else:  # a dropped row was no key: no gradient
                gb = grad.index_select(0, rows_b.clamp(max=ctx.length - 1))
                gb.masked_fill_((rows_b == ctx.length).view(-1, *[1] * (grad.dim() - 1)), 0)
        return ga, gb, None, None, None


def window_layout(image: torch.Tensor, text: torch.Tensor, index: WindowIndex) -> torch.Tensor:
    """image [N, ...], text [T, ...] -> [K, ...] the keys of a CASA index in its per-window
    [image_w | text_w] layout (K = N + T, or fewer with eq. 3's indicator)."""
    if index.kv_gather is not None:
        return torch.cat([image, text])[index.kv_gather]
    return _WindowLayout.apply(image, text, *index.kv_rows)


def window_keys(image: torch.Tensor, text: torch.Tensor, index: WindowIndex) -> torch.Tensor:
    """The keys (or values) a window index's queries attend to: image [N, ...] (projected
    image tokens), text [T, ...] -> [K, ...], window by window (`index.cu_k`)."""
    if index.kind == "casa":
        return window_layout(image, text, index)
    return image if index.kv_gather is None else image[index.kv_gather]


def visible_layout(kind: str, window_cu_text: list[int], window_cu_image: list[int], visible: list[list[int]],
                   indicator: bool) -> tuple[list[int], list[int], list[int]]:
    """The keys of windows that see other windows' images too (pure, host lists):
    window boundaries [W+1], [W+1] (each window's own images), visible[w] the windows whose
    images window w sees -> (gather rows [K] into cat([images N, text T]), cu_k [W+1],
    image keys of each window, cumulated [W+1]). CASA keys are [those images | text_w]; CA's
    the images; with the indicator a CASA window that sees no image has no key."""
    N = window_cu_image[-1]
    rows, cu_k, cu_vis = [], [0], [0]
    for w, seen in enumerate(visible):
        img = [n for v in seen for n in range(window_cu_image[v], window_cu_image[v + 1])]
        rows += img
        if kind == "casa" and (img or not indicator):
            rows += range(N + window_cu_text[w], N + window_cu_text[w + 1])
        cu_k.append(len(rows))
        cu_vis.append(cu_vis[-1] + len(img))
    return rows, cu_k, cu_vis


def build_window_index(kind: str, window_cu_text: torch.Tensor, window_cu_image: torch.Tensor,
                       image_cos: torch.Tensor, image_sin: torch.Tensor, seqlens=None, *, indicator: bool = False,
                       visible: list[list[int]] | None = None, visible_windows=None) -> WindowIndex:
    """window_cu_text [W+1], window_cu_image [W+1] (the images opening each window),
    image_cos/sin [N, D]; seqlens: the batch's `casa.batch.SeqLens` (host maxima), or None;
    indicator: eq. 3's 1[i > K] (CASA⊕/→); visible: None (each window sees its own images) or
    per window the windows whose images it sees (`WindowedFusion.visible_windows`, made
    global), with `visible_windows` the rule itself for the cache."""
    if kind not in KINDS:
        raise ValueError(f"window index kind={kind!r} is not one of {list(KINDS)}")
    max_q = None if seqlens is None else seqlens.window_text
    causal = kind == "casa"
    if visible is not None:
        dev = window_cu_text.device
        rows, cu_k, cu_vis = visible_layout(kind, window_cu_text.tolist(), window_cu_image.tolist(), visible,
                                            indicator)
        return WindowIndex(kind, window_cu_text, torch.tensor(cu_k, dtype=torch.int32, device=dev), causal, None,
                           image_cos, image_sin, torch.tensor(cu_vis, dtype=torch.int32, device=dev), max_q=max_q,
                           max_k=max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0),
                           own_cu_image=window_cu_image, kv_gather=torch.tensor(rows, dtype=torch.long, device=dev),
                           indicator=indicator, visible_windows=visible_windows)
    if kind == "casa":
        cu_k, rows = casa_kv_rows(window_cu_text, window_cu_image, indicator)
        return WindowIndex(kind, window_cu_text, cu_k, True, rows, image_cos, image_sin, window_cu_image,
                           max_q=max_q, max_k=None if seqlens is None else seqlens.window_all, indicator=indicator)
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
    cu_t, cu_k, cu_i = index.cu_q.long(), index.cu_k.long(), index.window_cu_image.long()
    T = int(cu_t[-1])
    p = torch.arange(T, device=cu_t.device)
    w = window_of(cu_t, p)
    key_start = cu_k[w]  # first key of the window in the [image | text] layout
    n_img = cu_i[w + 1] - cu_i[w]  # image keys the window sees
    # a window without text keys (eq. 3's indicator: it sees no image) has no key to mask
    has_keys = cu_k[w + 1] - cu_k[w] > n_img
    self_key = torch.where(has_keys, key_start + n_img + p - cu_t[w], -1)
    if mode == "self":
        return self_key
    lo = key_start if mode == "rnd" else key_start + n_img
    num = torch.where(has_keys, self_key - lo, 0)  # candidates in [lo, self_key)
    u = torch.rand(T, generator=generator, device=cu_t.device)
    pick = lo + (u * num.clamp(min=1)).long().clamp(max=(num - 1).clamp(min=0))
    return torch.where(num > 0, pick, torch.full_like(pick, -1))


class WindowedFusion(FusionStrategy):
    """The windowed strategies (CA, gated CA, CASA, the Perceiver): the stream is the text
    alone; the image tokens (compressed first if the strategy compresses, `compress`) are kept
    aside, each window's text attending to its window's image tokens through the blocks'
    fusion layers, with one window index (`kind`) built per forward and shared by them all.

    Subclasses set `kind` (and `indicator`) and compose the blocks in `attach`. Three hooks
    change what windows see, one method each: `window_images` (each window's own image
    tokens and their positions), `visible_windows` (the window rule's reach: a CASA variant
    with another window rule overrides it, and the full forward, packed batches and the KV
    cache all follow it) and `masked_key`."""

    kind = "cross_attention"
    """Which window index the fusion layers read: one of `KINDS`."""
    indicator = False
    """Paper eq. 3's 1[i > K]: a window that sees no image gives its queries no update (CASA⊕/→).
    Without it a CASA window without image is windowed self-attention (CASA∨). CA windows
    without image give zeros either way (they have no key)."""

    def visible_windows(self, j: int) -> list[int]:
        """The window rule's reach: the j-th window of a sample (0, 1, ... in order, the text
        before its first image included) -> the windows of that sample whose images its
        queries see, each <= j, in key order. CASA: its own, [j].

        What the KV cache keeps follows from it (`casa.cache.KVCache.window`), which is why a
        window may see only windows that the window before it saw, plus itself: the cache
        then keeps the images the open window sees and the next one still needs."""
        return [j]

    @property
    def own_windows_only(self) -> bool:
        """Whether `visible_windows` is CASA's rule (each window sees its own images): the
        keys are then laid out without a gather (`casa_kv_rows`). Decided by the class, once."""
        return type(self).visible_windows is WindowedFusion.visible_windows

    def visible(self, sample_cu_seqlens, window_cu_text) -> list[list[int]]:
        """`visible_windows` over a batch's windows (host lists): [W] the (global) windows
        whose images each window sees. Raises ValueError if the rule looks ahead or across
        samples."""
        owner, first = window_samples(sample_cu_seqlens, window_cu_text)
        out, start = [], 0
        for w, (s, f) in enumerate(zip(owner, first)):
            start = w if f else start
            seen = list(self.visible_windows(w - start))
            if any(not 0 <= v <= w - start for v in seen):
                raise ValueError(f"{type(self).__name__}.visible_windows({w - start}) = {seen}: a window sees "
                                 f"windows 0..{w - start} of its sample only")
            out.append([start + v for v in seen])
        return out

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
        cu_t = batch.window_cu_seqlens_text
        if self.own_windows_only:
            index = build_window_index(self.kind, cu_t, cu_i, icos, isin, lens, indicator=self.indicator)
        else:
            index = build_window_index(self.kind, cu_t, cu_i, icos, isin, None, indicator=self.indicator,
                                       visible=self.visible(batch.sample_cu_seqlens, cu_t),
                                       visible_windows=self.visible_windows)
            index.max_q = None if lens is None else lens.window_text  # max_k: the layout's, on the host
        if cu_i is not batch.window_cu_seqlens_image and self.own_windows_only:
            # not the batch's windows: a bound from the fixed-size compression, if there is one
            bound = self.compressed_bound(batch.num_images)
            index.max_k = None if lens is None or bound is None else \
                bound + (lens.window_text if self.kind == "casa" else 0)
        index.masked_key = self.masked_key(index)
        ctx = StreamContext(batch.sample_cu_seqlens, cos, sin, windows=index,
                            max_seqlen=None if lens is None else lens.sample_text)
        return text_embeds, images.to(dtype), ctx
