"""How long a cached conversation may grow: `ContextPolicy`, and RoPE as a key mover.

A live stream adds text every frame, so without a limit its SA cache grows for as long as
the video lasts and its positions run past `max_position_embeddings`. The policy says when
to trim and what to keep; `casa.cache.KVCache.trim` does it (its module doc, "Context
limit", says why moving kept keys back by a RoPE rotation is exact for their positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casa.cache import KVCache


@dataclass
class ContextPolicy:
    """How long a cached conversation may grow (live captioning: hours of frames).

    Before each chunk the caller asks `make_room(cache, incoming)`; when the SA cache plus the
    chunk and its answer (`incoming` tokens) would pass `max_tokens`, the cache is trimmed to
    its first `keep_first` tokens and its last `keep_last` (`KVCache.trim`), positions
    re-encoded. So the SA cache never holds more than `max_tokens` tokens and no position
    passes `max_tokens - 1`; with `max_tokens <= max_position_embeddings` (the default of
    `Assistant.stream`) the model never sees a position it was not built for."""

    max_tokens: int
    """Most tokens the SA cache holds (per sample)."""
    keep_first: int
    """Opening tokens kept for ever (the stream's prompt)."""
    keep_last: int | None = None
    """Recent tokens kept by a trim (None: half of what `max_tokens` leaves after `keep_first`,
    so a trim, which copies the kept keys once, happens every ~max_tokens / 2 tokens)."""

    def __post_init__(self):
        if self.keep_last is None:
            self.keep_last = max(1, (self.max_tokens - self.keep_first) // 2)
        if self.keep_first < 0 or self.keep_last < 1 or self.keep_first + self.keep_last >= self.max_tokens:
            raise ValueError(f"ContextPolicy: keep_first={self.keep_first} (>= 0) + keep_last={self.keep_last} (>= 1) "
                             f"must be below max_tokens={self.max_tokens}")

    def make_room(self, cache: KVCache, incoming: int, rotate) -> int:
        """Trim `cache` if `incoming` more tokens would pass `max_tokens` -> tokens dropped
        (per sample, the most of any). rotate: `rotate(k [n, Hkv, D], d) -> k` moving keys d
        positions back (`key_shifter`)."""
        room = self.max_tokens - self.keep_first - self.keep_last
        if incoming > room:
            raise ValueError(f"ContextPolicy: a chunk and its answer take up to {incoming} tokens, more than the "
                             f"{room} that max_tokens={self.max_tokens} leaves after keep_first={self.keep_first} + "
                             f"keep_last={self.keep_last}: raise max_tokens or lower keep_last / max_new_tokens")
        if max(cache.lengths(), default=0) + incoming <= self.max_tokens:
            return 0
        return cache.trim(self.keep_first, self.keep_last, rotate)


def key_shifter(backbone):
    """The backbone's RoPE as a key mover: rotate(k [n, Hkv, D], d) -> k [n, Hkv, D] as if
    computed d positions earlier (the family's own `apply_rotary_pos_emb` with the tables of
    position -d, all three M-RoPE components alike: a text token has t = h = w, and an image
    key of a CASA window sits at its window's text position in each). Rotation in fp32, the
    result in k's dtype; HF's `attention_scaling` (1 for default RoPE) is divided out, since
    the cached keys carry it already."""
    rotary = backbone._inner().rotary_emb
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)

    def rotate(k: torch.Tensor, d: int) -> torch.Tensor:
        if k.shape[0] == 0 or d == 0:
            return k
        pos = torch.full((1,), -int(d), dtype=torch.long, device=k.device)
        cos, sin = backbone.rope(pos, torch.float32)  # [1, D]
        cos, sin = (cos / scale).expand(k.shape[0], -1), (sin / scale).expand(k.shape[0], -1)  # [n, D]
        _, out = backbone.family_spec.rope_fn(k.float(), k.float(), cos, sin, unsqueeze_dim=1)
        return out.to(k.dtype)

    return rotate
