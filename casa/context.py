"""What every decoder block is told about the current batch: the `StreamContext`.

A fusion strategy's `prepare` builds one `StreamContext` per forward; the model adds the
capture recorder and the KV cache; every `casa.blocks.DecoderBlock` and fusion layer reads
it. This module sits below both (it imports only torch), so the blocks never import the
fusion package and the fusion package imports the blocks, never the other way round.

    fusion strategy ──prepare──> StreamContext ──> DecoderBlock ──> fusion layers
                                 (+ WindowIndex)    casa.blocks      casa.fusion.layers

Read-only for the blocks. Under FSDP2 a MixedPrecisionPolicy that casts inputs rebuilds
every dataclass it is handed (`torch.distributed.utils._apply_to_tensors` calls
`dataclasses.replace`), so a block may receive a copy of the model's context: nothing a
block assigns to a field is seen by the next block or by the model. What the layers hand
back goes into an `AttentionRecorder`, which the cast passes through as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:  # typing only: casa.cache imports this module at run time
    from casa.cache import KVCache


class AttentionRecorder:
    """Where fusion layers put their attention records during `capture_attention`.

    Deliberately not a list, dict or dataclass: FSDP2 with a MixedPrecisionPolicy casts a
    block's inputs by rebuilding those containers (`torch.distributed.utils._apply_to_tensors`),
    so a list in the StreamContext reached the layers as a copy and every record was lost.
    Objects of other types are handed to the block as they are."""

    def __init__(self):
        self.records: list[dict] = []

    def append(self, record: dict) -> None:
        self.records.append(record)


@dataclass
class WindowIndex:
    """What CA and CASA layers need about a batch's windows (`casa.fusion.windows`), built
    once per forward by `casa.fusion.windows.build_window_index` and shared by every fused layer."""

    kind: str
    """Which fused layers it serves: "casa" or "cross_attention" (`casa.fusion.windows.KINDS`)."""
    cu_q: torch.Tensor
    """[W+1] int32 window boundaries of the queries (text tokens)."""
    cu_k: torch.Tensor
    """[W+1] int32 window boundaries of the keys ([image_w | text_w] for CASA, image_w for CA)."""
    causal: bool
    kv_rows: tuple[torch.Tensor, torch.Tensor, int] | None
    """([N], [T]) int64 the layout row of each image key and each text key, and K the keys as a
    host int (CASA, each window seeing its own images); a text token that is no key
    (`indicator`) has row K (none)."""
    image_cos: torch.Tensor
    image_sin: torch.Tensor
    """[N, D] rotary tables of the image tokens (positions of `casa.positions.window_image_positions`)."""
    window_cu_image: torch.Tensor
    """[W+1] int32 image keys each window sees, first in its keys (attention-map capture, Table 8)."""
    masked_key: torch.Tensor | None = None
    """[T] int64 key hidden from each query (Table 8 inference masks), -1 = none."""
    max_q: int | None = None
    max_k: int | None = None
    """Longest query / key window as host ints (`casa.batch.SeqLens`), or None (unknown)."""
    own_cu_image: torch.Tensor | None = None
    """[W+1] int32 the images that open each window (rows of the image tokens), None: the
    same as `window_cu_image` (each window sees its own images only)."""
    kv_gather: torch.Tensor | None = None
    """[K] int64 rows of cat([images, text]) forming the keys, window by window, when a window
    also sees earlier windows' images (`visible_windows`); None: the `kv_rows` layout."""
    indicator: bool = False
    """Paper eq. 3's 1[i > K]: a window that sees no image token has no keys at all, so its
    queries get no update (CASA⊕/→; CASA∨ replaces SA, so its text-only windows keep theirs)."""
    visible_windows: Callable[[int], Sequence[int]] | None = None
    """The strategy's window rule for the cache (`casa.fusion.windows.WindowedFusion.visible_windows`):
    window j of a sample (0, 1, ... in order) -> the windows whose images it sees; None: [j]."""


@dataclass
class StreamContext:
    """Everything a block needs about the current batch, built once per forward.

    The stream is [L, d]: the text alone (L = T) for windowed strategies, text and image
    tokens merged (L = T + N') for insertion and the Q-Former."""

    cu_seqlens: torch.Tensor
    """[S+1] int32 sample boundaries in the stream (SA is block-diagonal causal)."""
    cos: torch.Tensor
    sin: torch.Tensor
    """[L, D] rotary tables of the stream tokens."""
    windows: WindowIndex | None = None
    """The windowed strategies' window index, or None for strategies without windowed fusion."""
    capture: AttentionRecorder | None = None
    """Set by the model inside `capture_attention`: fusion layers append attention records to it."""
    cache: KVCache | None = None
    """Set by the model during cached generation: SA and fused layers read and extend it."""
    max_seqlen: int | None = None
    """Longest segment of cu_seqlens as a host int (`casa.batch.SeqLens`), or None: flash-attn's
    max_seqlen, then read from cu_seqlens (a host sync per layer)."""
    text_rows: torch.Tensor | None = None
    """[T] int64 row of each text token in the stream when image tokens are merged into it
    (insertion, Q-Former; `casa.positions.insertion_layout`), or None: the stream is the text."""
    text_positions: torch.Tensor | None = None
    """[T] the text tokens' 1-D RoPE positions (the temporal row under M-RoPE) when the strategy
    renumbers them (insertion: merged image tokens take positions too), or None: the batch's
    `position_ids` are the text's. The KV cache advances each sample from its last one."""
