"""The vision encoder: the Qwen2.5-VL vision tower (native resolution, 14 px patches,
2x2 token merge, windowed attention) with a configurable trainable tail.

It only sees patches: decoding, mode conversion and resizing to `max_pixels` happen in
`data.image`. Images of a batch are encoded in one call (the tower attends within each
image only); a video frame is simply one more image (t = 1), so frames are processed
one by one as images, as in the paper.

Trainable set (paper §4.1: the last 4 vision blocks are trained): with `freeze=True`
everything is frozen except the last `trainable_blocks` blocks *and the merger* — the
merger maps vision features into the space the projector/LM reads, and is what must
move first when the LM changes (it is part of the "last layers" of the tower).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def tiny_vision_config(out_hidden_size: int = 64) -> dict[str, Any]:
    """A 2-block Qwen2.5-VL vision tower that builds in milliseconds (tests, the demo)."""
    return dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=out_hidden_size,
                patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                fullatt_block_indexes=[1], in_channels=3)


def _load_tower(path: Path):
    from safetensors.torch import load_file
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = json.loads((path / "config.json").read_text())
    vision_cfg = cfg.get("vision_config", cfg if cfg.get("model_type") == "casa_vision" else None)
    if vision_cfg is None:
        raise ValueError(f"{path}/config.json has no vision_config (expected a Qwen2.5-VL checkpoint)")
    vision_cfg = {k: v for k, v in vision_cfg.items() if k not in ("model_type", "transformers_version")}
    tower = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**vision_cfg))
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            for prefix in ("model.visual.", "visual.", "tower."):
                if k.startswith(prefix):
                    state[k[len(prefix):]] = v
    if not state:
        raise FileNotFoundError(f"no vision weights (visual.* / model.visual.*) in {path}/*.safetensors")
    tower.load_state_dict(state, strict=True)
    return tower, vision_cfg


class VisionEncoder(nn.Module):
    """Args:
        config: Qwen2_5_VLVisionConfig fields (random init; see `tiny_vision_config`).
        path: a local Qwen2.5-VL checkpoint directory (or one written by `save_pretrained`).
        trainable_blocks: how many of the last blocks train when `freeze` (paper: 4).
        freeze: freeze the tower except the last `trainable_blocks` blocks and the merger.
    """

    def __init__(self, config: dict[str, Any] | None = None, path: str | None = None, trainable_blocks: int = 4,
                 freeze: bool = True):
        super().__init__()
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        if (config is None) == (path is None):
            raise ValueError("VisionEncoder needs exactly one of `config` (random init) or `path` (local checkpoint)")
        if path is not None:
            p = Path(path)
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"VisionEncoder.path={path!r}: no config.json there (a local directory is required; nothing is downloaded)")
            self.tower, self.config = _load_tower(p)
        else:
            self.config = dict(config)
            self.tower = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**self.config))
        depth = len(self.tower.blocks)
        if trainable_blocks < 0:
            raise ValueError(f"VisionEncoder.trainable_blocks={trainable_blocks} must be >= 0 (the tower has {depth} blocks)")
        trainable_blocks = min(trainable_blocks, depth)  # the paper's 4 on a 2-block tiny tower = all blocks
        self.out_dim = int(self.tower.config.out_hidden_size)
        self.spatial_merge_size = int(self.tower.config.spatial_merge_size)
        if freeze:
            for p in self.tower.parameters():
                p.requires_grad_(False)
            trainable = list(self.tower.blocks[depth - trainable_blocks:]) if trainable_blocks else []
            if trainable_blocks:
                trainable.append(self.tower.merger)
            for m in trainable:
                for p in m.parameters():
                    p.requires_grad_(True)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, C*2*14*14], image_grid_thw [I, 3] -> image_embeds [N, out_dim], N = P / merge**2."""
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), grid_thw=image_grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in self.tower.config.to_dict().items() if not k.startswith("_")}
        (d / "config.json").write_text(json.dumps({"model_type": "casa_vision", "vision_config": cfg}, indent=1))
        save_file({f"tower.{k}": v.contiguous() for k, v in self.tower.state_dict().items()}, str(d / "model.safetensors"))
