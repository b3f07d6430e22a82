"""Analytic FLOPs of one training step on a packed batch, for every fusion strategy.

    count_flops(ModelDims, BatchLayout) -> FlopCount(forward, backward)
    training_flops(model, batch) -> int       (the two read off a model and a PackedBatch)

A pure function of the model's dimensions and the batch's layout (no tensors), so a planner
can price a batch it has not built. What is counted, and the conventions:

- Matrix products only, 2 FLOPs per multiply-add: every linear layer, the patch-embedding
  convolution, and attention's two products (scores q kᵀ and the weighted sum of v).
  Norms, activations, RoPE, softmax, the loss and embedding lookups are not counted (nor
  the few-FLOP RoPE frequency table product); `torch.utils.flop_counter` counts the same.
- Attention over a segment of Lq queries and Lk keys costs 4 Lq Lk H D whether or not it is
  causal (the convention of PaLM's MFU and of `flop_counter`): per sample for self-attention,
  per window ([image_w | text_w] keys) for CASA, image_w keys for CA, per image frame
  (full-attention blocks) or per spatial window (the other blocks) in the vision tower, per
  image for the Q-Former and the Perceiver resampler ([image_i | latents_i] keys; its gated
  CA layers attend to Q compressed tokens per image).
- Backward: per product, one forward's worth for the gradient of each operand that needs one.
  A linear's input gradient is computed when its input depends on a trainable parameter, its
  weight gradient when its weight trains; so a frozen tower head costs its forward only, a
  frozen backbone block after a fused one costs forward + input gradients. Outputs nothing
  reads (CA layers project text keys and values they never use) cost their forward only.
- Model FLOPs: activation checkpointing's recomputed forwards are not counted (MFU, not HFU).

`tests/test_flops.py` checks the count against `torch.utils.flop_counter.FlopCounterMode` on the
tiny model of every strategy, forward and backward separately.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from casa.batch import image_token_count, window_samples


@dataclass(frozen=True)
class VisionDims:
    patch_dim: int
    """C * temporal_patch * patch * patch, the patch-embedding convolution's input."""
    hidden: int
    intermediate: int
    out_dim: int
    merge: int
    window: int
    """Spatial attention window in merged tokens per side (window_size // merge // patch_size)."""
    full_attention: tuple[int, ...]
    """Blocks that attend over a whole frame instead of a window."""
    trainable: tuple[bool, ...]
    """Per block: its weights train."""
    patch_embed_trainable: bool
    merger_trainable: bool


@dataclass(frozen=True)
class QFormerDims:
    num_queries: int
    depth: int
    form: str = "blip2"
    """`casa.fusion.qformer.QFormer.form`: "joint" (one transformer over [image | queries]) or "blip2"."""


@dataclass(frozen=True)
class PerceiverDims:
    num_latents: int
    depth: int


@dataclass(frozen=True)
class ModelDims:
    """What the count needs of a `VisionLanguageModel`: `ModelDims.of(model)`."""

    vision: VisionDims
    projector: str
    """"mlp", "linear" or "identity" (its parameters are new: they train)."""
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    backbone_trainable: bool
    blocks: tuple[str, ...]
    """Per decoder block the form of its attention step (`casa.blocks.AttentionStep.form`)."""
    fusion_kind: str | None
    """"casa" or "cross_attention" for windowed strategies, None for insertion / Q-Former."""
    image_ffn_updates: tuple[bool, ...]
    qformer: QFormerDims | None = None
    perceiver: PerceiverDims | None = None
    """The Perceiver resampler's, whose compressed tokens the fused layers attend to."""
    indicator: bool = False
    """Paper eq. 3's 1[i > K] (`WindowedFusion.indicator`): a CASA window that sees no image has no key."""
    visible_windows: Callable[[int], Sequence[int]] | None = None
    """The window rule's reach (`WindowedFusion.visible_windows`), None: each window sees its own images."""
    fusion_shares_attention: bool = False
    """The fusion layers compute with their block's SA weights (`casa.fusion.casa_shared`): they
    train when the backbone does, not always as a new layer's do."""

    @staticmethod
    def of(model) -> "ModelDims":
        from casa.fusion.perceiver import PerceiverCrossAttention
        from casa.fusion.qformer import QFormer

        tower = model.vision.tower
        cfg = tower.config
        trains = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
        vision = VisionDims(
            patch_dim=cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2, hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size, out_dim=cfg.out_hidden_size, merge=cfg.spatial_merge_size,
            window=cfg.window_size // cfg.spatial_merge_size // cfg.patch_size,
            full_attention=tuple(cfg.fullatt_block_indexes), trainable=tuple(trains(b) for b in tower.blocks),
            patch_embed_trainable=trains(tower.patch_embed), merger_trainable=trains(tower.merger))
        backbone, fusion = model.backbone, model.fusion
        attn = backbone.layers[0].self_attn
        kind = getattr(fusion, "kind", None)  # the window index of a `WindowedFusion`
        return ModelDims(
            vision=vision, projector=model.projector.kind, d=backbone.hidden_size,
            heads=attn.q_proj.out_features // attn.head_dim, kv_heads=attn.k_proj.out_features // attn.head_dim,
            head_dim=attn.head_dim, intermediate=backbone.layers[0].mlp.gate_proj.out_features,
            vocab=backbone.lm_head.out_features, backbone_trainable=trains(backbone.layers[0].mlp),
            blocks=tuple(b.attention.form for b in backbone.layers), fusion_kind=kind,
            image_ffn_updates=tuple(b.image_ffn_updates for b in backbone.layers),
            qformer=QFormerDims(fusion.num_queries, fusion.depth, fusion.form) if isinstance(fusion, QFormer) else None,
            perceiver=(PerceiverDims(fusion.num_latents, fusion.depth)
                       if isinstance(fusion, PerceiverCrossAttention) else None),
            indicator=bool(getattr(fusion, "indicator", False)),
            visible_windows=None if getattr(fusion, "own_windows_only", True) else fusion.visible_windows,
            fusion_shares_attention=bool(getattr(fusion, "shares_attention", False)))


@dataclass(frozen=True)
class BatchLayout:
    """The shape of a packed batch: `BatchLayout.of(batch)`."""

    samples: tuple[tuple[int, int, int], ...]
    """Per sample: (text tokens, image tokens, images)."""
    windows: tuple[tuple[int, int], ...]
    """Per window: (text tokens, image tokens)."""
    images: tuple[tuple[int, int, int], ...]
    """Per image: its (t, h, w) patch grid."""
    window_images: tuple[int, ...] = ()
    """Per window: how many images opened it (a resampler gives each its Q tokens)."""
    window_first: tuple[bool, ...] = ()
    """Per window: whether it is its sample's first (`casa.batch.window_samples`)."""

    @staticmethod
    def of(batch, merge: int = 2) -> "BatchLayout":
        win_t = batch.window_cu_seqlens_text.tolist()
        win_i = batch.window_cu_seqlens_image.tolist()
        sample_cu = batch.sample_cu_seqlens.tolist()
        windows = tuple((win_t[w + 1] - win_t[w], win_i[w + 1] - win_i[w]) for w in range(len(win_t) - 1))
        grids = tuple(tuple(g) for g in batch.image_grid_thw.tolist())
        # windows never cross samples: a sample's image tokens are its windows'; images are in
        # stream order, so they are handed to the samples in turn until those tokens are used up
        at = {t: i for i, t in enumerate(win_t)}
        tokens_of_image = image_token_count(grids, merge)
        samples, image = [], 0
        for s in range(len(sample_cu) - 1):
            n = win_i[at[sample_cu[s + 1]]] - win_i[at[sample_cu[s]]]
            first, left = image, n
            while left > 0:
                left -= tokens_of_image[image]
                image += 1
            samples.append((sample_cu[s + 1] - sample_cu[s], n, image - first))
        window_images, image = [], 0
        for _, n in windows:  # the same walk per window
            first = image
            while n > 0:
                n -= tokens_of_image[image]
                image += 1
            window_images.append(image - first)
        return BatchLayout(tuple(samples), windows, grids, tuple(window_images),
                           tuple(window_samples(sample_cu, win_t)[1]))


@dataclass
class FlopCount:
    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def matmul(self, m: int, k: int, n: int, input_grad: bool, weight_grad: bool, used: bool = True) -> bool:
        """[m, k] @ [k, n] (a linear layer: input [m, k], weight [n, k]) -> whether its output
        needs a gradient. `used=False`: nothing reads the output (no backward)."""
        f = 2 * m * k * n
        self.forward += f
        if used:
            self.backward += f * (int(input_grad) + int(weight_grad))
        return input_grad or weight_grad

    def attention(self, pairs: int, width: int, q_grad: bool, k_grad: bool, v_grad: bool) -> bool:
        """Scores and weighted values over `pairs` = Σ Lq·Lk (query, key) pairs with H·D = width."""
        half = 2 * pairs * width
        self.forward += 2 * half
        self.backward += half * (int(q_grad) + int(k_grad))  # dQ = dS K, dK = dSᵀ Q
        self.backward += half * (int(q_grad or k_grad) + int(v_grad))  # dP = dO Vᵀ, dV = Pᵀ dO
        return q_grad or k_grad or v_grad


def _vision(c: FlopCount, v: VisionDims, images: tuple[tuple[int, int, int], ...]) -> bool:
    """The tower over every image -> whether the image tokens need a gradient."""
    P = sum(t * h * w for t, h, w in images)
    m2 = v.merge ** 2
    frames = sum(t * (h * w) ** 2 for t, h, w in images)  # full attention: one segment per frame
    windows = 0
    for t, h, w in images:
        rows = [min(v.window, h // v.merge - r) for r in range(0, h // v.merge, v.window)]
        cols = [min(v.window, w // v.merge - c) for c in range(0, w // v.merge, v.window)]
        windows += t * sum((r * c * m2) ** 2 for r in rows for c in cols)
    E = v.hidden
    x = c.matmul(P, v.patch_dim, E, False, v.patch_embed_trainable)
    for b, trains in enumerate(v.trainable):
        h = x or trains  # norm1's weight trains with the block
        qkv = c.matmul(P, E, 3 * E, h, trains)
        a = c.attention(frames if b in v.full_attention else windows, E, qkv, qkv, qkv)
        a = c.matmul(P, E, E, a, trains)
        x = x or a
        h = x or trains
        gate = c.matmul(P, E, v.intermediate, h, trains)
        c.matmul(P, E, v.intermediate, h, trains)
        x = c.matmul(P, v.intermediate, E, gate, trains) or x
    N, mt = P // m2, v.merger_trainable
    h = c.matmul(N, m2 * E, m2 * E, x or mt, mt)
    return c.matmul(N, m2 * E, v.out_dim, h, mt)


def _projector(c: FlopCount, m: ModelDims, N: int, x: bool) -> bool:
    if m.projector == "identity":
        return x
    h = c.matmul(N, m.vision.out_dim, m.d, x, True)
    return c.matmul(N, m.d, m.d, h, True) if m.projector == "mlp" else h


def _qformer(c: FlopCount, m: ModelDims, layout: BatchLayout, image: bool) -> None:
    """Q learned queries per image through `depth` layers (all new parameters: they train)."""
    d, Q = m.d, m.qformer.num_queries
    tokens = image_token_count(layout.images, m.vision.merge)
    L, N = Q * len(tokens), sum(tokens)
    if m.qformer.form == "joint":  # every row of [image_i | queries] through the block: the queries train
        for _ in range(m.qformer.depth):
            c.matmul(N + L, d, 3 * d, True, True)
            c.attention(sum((n + Q) ** 2 for n in tokens), d, True, True, True)
            c.matmul(N + L, d, d, True, True)
            c.matmul(N + L, d, 4 * d, True, True)
            c.matmul(N + L, 4 * d, d, True, True)
        return
    for _ in range(m.qformer.depth):
        c.matmul(L, d, 3 * d, True, True)
        c.attention(Q * Q * len(tokens), d, True, True, True)
        c.matmul(L, d, d, True, True)
        c.matmul(L, d, d, True, True)  # ca_q
        c.matmul(N, d, 2 * d, image, True)  # ca_kv over the image tokens
        c.attention(Q * sum(tokens), d, True, True, True)
        c.matmul(L, d, d, True, True)
        c.matmul(L, d, 4 * d, True, True)
        c.matmul(L, 4 * d, d, True, True)


def _perceiver(c: FlopCount, m: ModelDims, layout: BatchLayout, image: bool) -> None:
    """Q learned latents per image through `depth` layers (all new parameters: they train);
    the keys of image i are [image_i | latents_i], projected in one product."""
    d, Q = m.d, m.perceiver.num_latents
    tokens = image_token_count(layout.images, m.vision.merge)
    L, N = Q * len(tokens), sum(tokens)
    for _ in range(m.perceiver.depth):
        c.matmul(L, d, d, True, True)  # to_q
        c.matmul(N + L, d, 2 * d, True, True)  # to_kv: the latents' rows need a gradient
        c.attention(sum(Q * (n + Q) for n in tokens), d, True, True, True)
        c.matmul(L, d, d, True, True)  # to_out
        c.matmul(L, d, 4 * d, True, True)
        c.matmul(L, 4 * d, d, True, True)


def _mlp(c: FlopCount, m: ModelDims, L: int, x: bool, used: bool = True) -> bool:
    bt = m.backbone_trainable
    h = x or bt  # post_attention_layernorm's weight trains with the backbone
    gate = c.matmul(L, m.d, m.intermediate, h, bt, used)
    c.matmul(L, m.d, m.intermediate, h, bt, used)
    return c.matmul(L, m.intermediate, m.d, gate, bt, used)


def _window_attention(c: FlopCount, m: ModelDims, layout: BatchLayout, h: bool, image: bool, trains: bool,
                      kind: str, norm_trains: bool = False) -> bool:
    """A CASA / CA layer (or CASA∨'s SA) over normalised text h: q, k, v of the text, k, v of
    the images, attention per window, o_proj -> whether its output needs a gradient.
    norm_trains: the images' norm trains (folded into their K/V weight, `casa.image_kv`)."""
    T = sum(t for t, _ in layout.windows)
    N = sum(n for _, n in layout.windows)
    HD, KD = m.heads * m.head_dim, m.kv_heads * m.head_dim
    casa = kind == "casa"
    q = c.matmul(T, m.d, HD, h, trains)
    kt = c.matmul(T, m.d, KD, h, trains, used=casa)  # CA projects text keys it never reads
    c.matmul(T, m.d, KD, h, trains, used=casa)
    ki = c.matmul(N, m.d, 2 * KD, image, trains or norm_trains)  # image keys and values: one product
    k = ki or (kt and casa)
    pairs = sum(t * (n + t) if casa and (n or not m.indicator) else t * n for t, n in _seen(m, layout))
    a = c.attention(pairs, HD, q, k, k)
    return c.matmul(T, HD, m.d, a, trains)


def _seen(m: ModelDims, layout: BatchLayout) -> list[tuple[int, int]]:
    """Per window: (text tokens, image tokens its queries see under the window rule)."""
    if m.visible_windows is None:
        return list(layout.windows)
    out, start = [], 0
    for w, (t, _) in enumerate(layout.windows):
        start = w if layout.window_first[w] else start
        out.append((t, sum(layout.windows[start + v][1] for v in m.visible_windows(w - start))))
    return out


def _self_attention(c: FlopCount, m: ModelDims, lengths: list[int], h: bool) -> bool:
    bt, L = m.backbone_trainable, sum(lengths)
    HD, KD = m.heads * m.head_dim, m.kv_heads * m.head_dim
    q = c.matmul(L, m.d, HD, h, bt)
    c.matmul(L, m.d, KD, h, bt)
    c.matmul(L, m.d, KD, h, bt)
    a = c.attention(sum(n * n for n in lengths), HD, q, q, q)
    return c.matmul(L, HD, m.d, a, bt)


def count_flops(m: ModelDims, layout: BatchLayout) -> FlopCount:
    """Forward and backward FLOPs of one training step of model `m` on a batch of `layout`."""
    c = FlopCount()
    bt = m.backbone_trainable
    T = sum(t for t, _, _ in layout.samples)
    image = False
    if layout.images:  # a text-only batch skips the tower (`VisionLanguageModel.encode_images`)
        image = _projector(c, m, sum(n for _, n, _ in layout.samples), _vision(c, m.vision, layout.images))
    x = bt  # the token embeddings train with the backbone
    if m.fusion_kind is None:  # insertion (Q-Former: Q tokens per image): one longer stream
        if m.qformer is not None:
            _qformer(c, m, layout, image)
            lengths = [t + k * m.qformer.num_queries for t, _, k in layout.samples]
            image = bool(layout.images)  # the learned queries train
        else:
            lengths = [t + n for t, n, _ in layout.samples]
        x = x or (image and bool(layout.images))
    else:
        lengths = [t for t, _, _ in layout.samples]
        if m.perceiver is not None and layout.images:  # the fused layers attend to Q tokens per image
            _perceiver(c, m, layout, image)
            Q = m.perceiver.num_latents
            layout = replace(layout, windows=tuple((t, k * Q) for (t, _), k in zip(layout.windows, layout.window_images)))
            image = True  # the latents train
    L = sum(lengths)
    N = sum(n for _, n in layout.windows) if m.fusion_kind else 0
    fusion_trains = bt if m.fusion_shares_attention else True  # a new layer's weights always train
    for i, (mode, ffn_updates) in enumerate(zip(m.blocks, m.image_ffn_updates)):
        if mode == "before":
            # its own norm trains (and with it the images' folded K/V weight)
            x = _window_attention(c, m, layout, True, image, fusion_trains, m.fusion_kind, norm_trains=True) or x
        h = x or bt  # input_layernorm
        if mode == "replace":
            a = _window_attention(c, m, layout, h, image, bt, "casa")
        else:
            a = _self_attention(c, m, lengths, h)
        if mode == "parallel":
            a = _window_attention(c, m, layout, h, image, fusion_trains, m.fusion_kind) or a
        x = x or a
        x = _mlp(c, m, L, x) or x
        if ffn_updates and N:
            # updated image tokens only matter to a later fused block (the last update is unread)
            image = _mlp(c, m, N, image, used=any(b != "none" for b in m.blocks[i + 1:])) or image
    c.matmul(T, m.d, m.vocab, x or bt, bt)  # lm_head over the text positions
    if not (x or bt):  # nothing trains: no backward at all
        c.backward = 0
    return c


def training_flops(model, batch) -> int:
    """Forward + backward FLOPs of a training step of `model` (a `VisionLanguageModel`) on
    `batch` (a `PackedBatch`); reads the batch's boundaries on the host."""
    return count_flops(ModelDims.of(model), BatchLayout.of(batch, model.vision.spatial_merge_size)).total


__all__ = ["BatchLayout", "FlopCount", "ModelDims", "PerceiverDims", "QFormerDims", "VisionDims", "count_flops", "training_flops"]
