"""Rotary position embeddings on packed `[L, H, D]` tensors.

The Hugging Face rotary modules (1-D RoPE for Llama/Qwen2/Qwen3/Helium, M-RoPE for the
Qwen2.5-VL text model) return `cos, sin` of shape `[1, L, D]` for position ids `[1, L]`
(or `[3, 1, L]` for M-RoPE: transformers already recomposes the three sections into one
`[1, L, D]` table). Every rotary attention in casa (SA, CA, CASA; the Q-Former's own
attention has no RoPE) applies them with the family's own `apply_rotary_pos_emb`
(`casa.family.Family.rope_fn`, bound at build time from `casa.backbone.family_table`), and
image keys through `casa.image_kv`, which rotates in place in the layout the table names; so
1-D and multimodal RoPE need no separate code paths.

The tables come in the dtype the projections produce (`compute_dtype`): under autocast
(`precision: bf16-mixed`) a projection of the fp32 stream is bf16, and fp32 tables would
promote the rotated q and k back to fp32 while v stays bf16 (Hugging Face casts its tables
to the input dtype for the same reason; its kernels then cast q and k back down).
"""

from __future__ import annotations

import torch
from torch import nn


def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a linear layer outputs for `dtype` inputs on `device`: autocast's dtype when
    autocast is on for that device type, else `dtype` itself."""
    device_type = torch.device(device).type
    if dtype.is_floating_point and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def rope_tables(rotary: nn.Module, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [L] (1-D) or [3, L] (M-RoPE) -> cos, sin [L, D] from an HF rotary module,
    in `compute_dtype(dtype)`: the dtype of the q and k they rotate."""
    if position_ids.dim() == 1:
        pos = position_ids[None]  # [1, L]
    elif position_ids.dim() == 2 and position_ids.shape[0] == 3:
        pos = position_ids[:, None]  # [3, 1, L]
    else:
        raise ValueError(f"position_ids must be [L] or [3, L], got shape {tuple(position_ids.shape)}")
    probe = torch.empty(0, dtype=compute_dtype(dtype, position_ids.device), device=position_ids.device)
    cos, sin = rotary(probe, pos)  # [1, L, D] each
    return cos[0], sin[0]
