"""Tiny configurations for tests, benchmarks and the demo: real architectures, random
weights, built in well under a second, nothing downloaded.

The sizes keep every code path alive (GQA: 4 query heads over 2 key/value heads; an even
head dim for RoPE; M-RoPE sections that sum to head_dim / 2) while staying small enough
that a forward+backward of every strategy takes milliseconds on a laptop CPU.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_VOCAB = 160
"""Large enough for the char-level tokenizer of `casa.processing.tokenizer` (printable ASCII + specials)."""


def tiny_backbone_config(family: str = "llama", vocab_size: int = TINY_VOCAB, hidden_size: int = 64,
                         num_layers: int = 4) -> dict[str, Any]:
    """A config dict for `casa.backbone.Backbone(family, config=...)`."""
    head_dim = 16
    cfg: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=max(1, hidden_size // head_dim // 2),
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family == "qwen2_5_vl":
        cfg.pop("head_dim")  # Qwen2.5-VL derives head_dim = hidden_size / heads
        # M-RoPE: temporal/height/width sections over head_dim / 2 frequencies.
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return cfg


def tiny_vision_config(out_hidden_size: int = 64) -> dict[str, Any]:
    """A Qwen2.5-VL vision tower config (see `casa.vision.tiny_vision_config`)."""
    from casa.vision import tiny_vision_config as _tiny

    return _tiny(out_hidden_size)


def random_packed_batch(samples: list[list[tuple[str, Any]]], vocab_size: int = TINY_VOCAB, seed: int = 0,
                        patch_dim: int = 3 * 2 * 14 * 14, answer_fraction: float = 0.5, merge: int = 2):
    """A PackedBatch of random content with a given layout, for model tests.

    Each sample is a list of segments: ("text", n) n text tokens, or ("image", (h, w)) an
    image of h x w patches (h, w multiples of `merge`; h*w/merge**2 tokens). Windows follow
    `casa.batch.window_boundaries`: consecutive images share a window; text before a
    sample's first image is a window without image. Labels: the last `answer_fraction` of
    each sample's text are targets (pre-shifted)."""
    import torch

    from casa.batch import build_batch, collate_packed

    g = torch.Generator().manual_seed(seed)
    rows = []
    for segs in samples:
        ids, grids, img_pos, pix = [], [], [], []
        for kind, val in segs:
            if kind == "text":
                ids.extend(torch.randint(0, vocab_size, (val,), generator=g).tolist())
            elif kind == "image":
                h, w = val
                grids.append([1, h, w])
                img_pos.append(len(ids))
                pix.append(torch.randn(h * w, patch_dim, generator=g))
            else:
                raise ValueError(f"segment kind {kind!r} is not 'text' or 'image'")
        T = len(ids)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full((T,), -100, dtype=torch.long)
        start = int(T * (1 - answer_fraction))
        labels[start:T - 1] = input_ids[start + 1:]
        rows.append(build_batch(
            input_ids, [0, T], labels=labels, position_ids=torch.arange(T),
            pixel_values=torch.cat(pix) if pix else torch.zeros(0, patch_dim), image_grid_thw=grids,
            image_text_position=img_pos, merge=merge,
            meta=[{"key": f"s{len(rows)}", "task": "random", "group": "random"}],
        ))
    batch = collate_packed(rows)
    batch.validate()
    return batch


def tiny_model(fusion, family: str = "llama", hidden_size: int = 64, num_layers: int = 4, seed: int = 0,
               freeze_backbone: bool = False, attn_backend: str = "sdpa", projector: str = "mlp"):
    """A tiny `VisionLanguageModel` with the given strategy (an instance), random weights."""
    import torch

    from casa.backbone import Backbone
    from casa.model import VisionLanguageModel
    from casa.vision import VisionEncoder

    torch.manual_seed(seed)
    backbone = Backbone(family, config=tiny_backbone_config(family, hidden_size=hidden_size, num_layers=num_layers),
                        freeze=freeze_backbone, attn_backend=attn_backend)
    vision = VisionEncoder(config=tiny_vision_config(out_hidden_size=hidden_size), trainable_blocks=1)
    return VisionLanguageModel(backbone, vision, fusion, projector=projector)
