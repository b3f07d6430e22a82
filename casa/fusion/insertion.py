"""Token insertion: image tokens are merged into the text stream at their positions and go
through every SA layer, FFN and (at inference) the KV cache, like a standard VLM
(LLaVA, Qwen2.5-VL). The baseline CASA is measured against.

    text   t0 t1 t2 t3            image I0 I1 I2 before text index 2
    stream t0 t1 I0 I1 I2 t2 t3   (SA causal over the merged sample, logits read at t*)
"""

from __future__ import annotations

import torch
from torch import nn

from casa.batch import PackedBatch, image_token_count
from casa.context import StreamContext
from casa.fusion.base import FusionStrategy
from casa.positions import insertion_layout, insertion_positions


class Insertion(FusionStrategy):
    name = "insertion"

    def prepare(self, batch: PackedBatch, text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                backbone: nn.Module) -> tuple[torch.Tensor, torch.Tensor, StreamContext]:
        counts = image_token_count(batch.image_grid_thw, self.merge)  # [I]
        image_embeds, new_counts = self.compress(image_embeds, counts)
        inserted = new_counts if new_counts is not None else counts
        text_dst, image_dst, merged_cu = insertion_layout(batch.sample_cu_seqlens, batch.image_text_position, inserted)
        T, N, d = text_embeds.shape[0], image_embeds.shape[0], text_embeds.shape[1]
        stream = text_embeds.new_zeros(T + N, d)
        stream = stream.index_copy(0, text_dst, text_embeds).index_copy(0, image_dst, image_embeds.to(text_embeds.dtype))
        text_pos, image_pos = insertion_positions(batch.position_ids, batch.sample_cu_seqlens, batch.image_text_position,
                                                  batch.image_grid_thw, self.merge, self.mrope, new_counts)
        shape = (3, T + N) if self.mrope else (T + N,)
        pos = text_pos.new_zeros(shape)
        pos[..., text_dst] = text_pos
        pos[..., image_dst] = image_pos
        cos, sin = backbone.rope(pos, text_embeds.dtype)  # [T+N, D]
        # the merged samples' longest, as a host int when the batch knows it (`SeqLens`); after a
        # fixed-size compression, a bound (all the batch's images in one sample)
        lens, bound = batch.seqlens, self.compressed_bound(batch.num_images)
        max_seqlen = None if lens is None else lens.sample_all if new_counts is None else \
            None if bound is None else lens.sample_text + bound
        ctx = StreamContext(merged_cu, cos, sin, max_seqlen=max_seqlen,
                            text_rows=text_dst, text_positions=text_pos if text_pos.dim() == 1 else text_pos[0])
        return stream, text_embeds.new_zeros(0, d), ctx

    def text_states(self, stream: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        if ctx.text_rows is None:
            raise ValueError(f"{type(self).__name__}.text_states got a StreamContext without text_rows "
                             "(it was not built by this strategy's prepare)")
        return stream[ctx.text_rows]  # [T, d]
