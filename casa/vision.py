"""The vision encoder: the Qwen2.5-VL vision tower with a configurable trainable tail.

    pixel_values [P, C*tp*p*p] ──> patch_embed ──> blocks (window attention, full attention
    at `fullatt_block_indexes`) ──> merger (2x2 patches -> 1 token) ──> image_embeds [N, out_dim]

The tower is Hugging Face's `Qwen2_5_VisionTransformerPretrainedModel` used as is (its
`pooler_output` holds the merged tokens), so weights and numerics are the reference ones.

What it sees: only patches. Decoding, mode conversion, resizing to `max_pixels` keeping the
aspect ratio (paper §4.1: native resolution up to 896², i.e. at most 1024 tokens per image)
and patchifying happen in `casa.processing.image`. All images of a batch go through one call; the
tower attends within each image only, so this equals encoding them one by one.

Video: a frame is one more image with grid t = 1 (the data pipeline repeats the frame to
fill the temporal patch of 2), so frames are encoded independently, one by one, as in the
paper; the tower's own t > 1 grids (two frames fused per patch) are never produced by
`data/`, though the tower would accept them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
"""Hugging Face attention kernels the tower can run (flash needs CUDA and flash-attn)."""

WEIGHT_PREFIXES = ("model.visual.", "visual.")
"""Where the tower's weights live in a Qwen2.5-VL checkpoint: `visual.*` in Hub checkpoints
and in what transformers 5.x `save_pretrained` writes; `model.visual.*` in the in-memory
layout of transformers >= 4.52 (some re-saved checkpoints keep it)."""

SAVED_MODEL_TYPE = "casa_vision_encoder"
"""`model_type` of a directory written by `VisionEncoder.save_pretrained`: a vision-only
Qwen2.5-VL checkpoint (`vision_config` + `visual.*` weights), read by the same loader."""


def tiny_vision_config(out_hidden_size: int = 64) -> dict[str, Any]:
    """A 2-block Qwen2.5-VL vision tower that builds in milliseconds (tests, the demo).

    The last block uses full attention and the first window attention, like the real tower
    (full attention every 8th block); a 112 px window is 8x8 patches, so images larger than
    that exercise the window split."""
    return dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=out_hidden_size,
                patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                fullatt_block_indexes=[1], in_channels=3)


def _config_fields() -> set[str]:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    own = {f.name for f in dataclasses.fields(Qwen2_5_VLVisionConfig)}
    return own | set(Qwen2_5_VLVisionConfig.attribute_map)


def _build_config(fields: dict[str, Any], attn_implementation: str, where: str):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    fields = dict(fields)
    # bookkeeping keys of a saved config: not architecture, and `model_type` is a class constant
    for key in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"):
        fields.pop(key, None)
    if "in_chans" in fields:  # Hub Qwen2.5-VL configs predate the `in_channels` name
        fields.setdefault("in_channels", fields.pop("in_chans"))
    config = Qwen2_5_VLVisionConfig(**fields)
    config._attn_implementation = attn_implementation
    bad = [i for i in config.fullatt_block_indexes if not 0 <= i < config.depth]
    if bad:
        raise ValueError(f"{where}.fullatt_block_indexes={list(config.fullatt_block_indexes)} has indexes {bad} "
                         f"outside the valid range [0, depth={config.depth})")
    return config


def _read_checkpoint(directory: Path, attn_implementation: str):
    """-> (Qwen2_5_VLVisionConfig, vision state dict without prefix), reading only the tower.

    The full VLM is never instantiated: config.json's `vision_config` builds the tower, and
    only the safetensors shards that hold `visual.*` tensors are opened (the 3B LM stays on disk)."""
    from safetensors import safe_open

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"VisionEncoder.path={str(directory)!r}: no config.json in that directory "
                                f"(a local Qwen2.5-VL checkpoint or a VisionEncoder.save_pretrained directory "
                                f"is required; nothing is downloaded)")
    raw = json.loads(config_file.read_text())
    if "vision_config" not in raw:
        raise ValueError(f"VisionEncoder.path={str(directory)!r}: config.json has no 'vision_config' "
                         f"(model_type={raw.get('model_type')!r}); expected a Qwen2.5-VL checkpoint")
    config = _build_config(raw["vision_config"], attn_implementation, where=f"{config_file}:vision_config")

    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        files = sorted({directory / f for k, f in weight_map.items() if k.startswith(WEIGHT_PREFIXES)})
    else:
        files = sorted(directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                prefix = next((p for p in WEIGHT_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix):]] = f.get_tensor(key)
    if not state:
        searched = [f.name for f in files] or "any *.safetensors file"
        raise ValueError(f"VisionEncoder.path={str(directory)!r}: no vision tower weights (keys "
                         f"{[p + '*' for p in WEIGHT_PREFIXES]}) in {searched}")
    return config, state


class VisionEncoder(nn.Module):
    """Qwen2.5-VL vision tower: pixel_values [P, C*tp*p*p], image_grid_thw [I, 3] -> image_embeds [N, out_dim].

    Args:
        config: Qwen2_5_VLVisionConfig fields for a randomly initialised tower (tests, demo;
            see `tiny_vision_config`). Exactly one of `config` and `path`.
        path: a local directory, either a Qwen2.5-VL checkpoint (`save_pretrained` layout:
            only `vision_config` and the `visual.*` / `model.visual.*` tensors are read) or one
            written by `VisionEncoder.save_pretrained`. Nothing is ever downloaded.
        trainable_blocks: with `freeze`, how many of the last transformer blocks train (paper
            §4.1: the last 4 on images; 0 for the frozen video stage). Values above the
            tower's depth train every block, so the paper's default also runs on tiny towers.
        freeze: freeze the tower except its trainable tail; `False` trains everything.
        attn_implementation: Hugging Face attention kernel of the tower, one of
            `ATTN_IMPLEMENTATIONS` (`sdpa` on CPU; `flash_attention_2` on CUDA).
        blank_images: the blind control arm of a comparison: every image the model sees
            (training, validation, evaluation, generation: all go through this forward) is
            replaced by zeros, the normalisation mean (a uniform grey image), keeping its size
            and so its number of tokens. What such a model scores is chance given the text.

    Trainable tail: the last `trainable_blocks` blocks *and the merger* (the merger's
    LayerNorm + 2-layer MLP that maps 2x2 patch features to `out_hidden_size`). We read the
    paper's "last 4 layers" as the last 4 stages of the tower's computation, and the merger
    comes after every block: gradients to the blocks must flow through it anyway, so
    training it only adds its weight gradients, and it is the layer that maps into the space
    the projector/LM reads, which has to move most when the LM is not Qwen's own (Helium).
    With `trainable_blocks=0` the merger is frozen too, so the whole tower is frozen.

    Weights stay in float32 whatever the checkpoint's dtype; mixed precision is the
    trainer's job. Attributes: `tower` (the HF module; `tower.blocks` is what FSDP wraps),
    `out_dim` (= out_hidden_size), `spatial_merge_size`.
    """

    def __init__(self, config: dict[str, Any] | None = None, path: str | None = None, trainable_blocks: int = 4,
                 freeze: bool = True,
                 attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
                 blank_images: bool = False):
        super().__init__()
        self.blank_images = bool(blank_images)
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        if (config is None) == (path is None):
            raise ValueError(f"VisionEncoder needs exactly one of `config` (random init) or `path` (local checkpoint), "
                             f"got config={'set' if config is not None else None}, path={path!r}")
        if isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int) or trainable_blocks < 0:
            raise ValueError(f"VisionEncoder.trainable_blocks={trainable_blocks!r} must be an int >= 0 "
                             f"(0 = frozen tower; at most the tower depth is used)")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"VisionEncoder.attn_implementation={attn_implementation!r} is not one of "
                             f"{list(ATTN_IMPLEMENTATIONS)}")
        if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            # Hugging Face would raise an ImportError at build time: the same, naming the field
            raise ValueError(f"VisionEncoder.attn_implementation={attn_implementation!r} needs the flash-attn "
                             f"package (CUDA), which is not installed; one of {list(ATTN_IMPLEMENTATIONS)} "
                             f"('sdpa' on CPU)")

        if path is not None:
            tower_config, state = _read_checkpoint(Path(path), attn_implementation)
        else:
            unknown = sorted(set(config) - _config_fields())
            if unknown:
                raise ValueError(f"VisionEncoder.config has unknown fields {unknown}; valid fields: "
                                 f"{sorted(_config_fields())}")
            tower_config, state = _build_config(config, attn_implementation, where="VisionEncoder.config"), None
        self.tower = Qwen2_5_VisionTransformerPretrainedModel(tower_config)
        if state is not None:
            missing, unexpected = self.tower.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"VisionEncoder.path={path!r}: vision weights do not match vision_config: "
                                 f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")

        self.loaded = path is not None  # weights from a checkpoint (the optimiser's "pretrained" rule)
        self.out_dim = int(tower_config.out_hidden_size)
        self.spatial_merge_size = int(tower_config.spatial_merge_size)
        self._patch_dim = tower_config.in_channels * tower_config.temporal_patch_size * tower_config.patch_size ** 2
        self._set_trainable(freeze, min(trainable_blocks, len(self.tower.blocks)))

    def _set_trainable(self, freeze: bool, trainable_blocks: int) -> None:
        """Decided once at build time (STYLE 6); the frozen head builds no autograd graph."""
        if not freeze:
            self.tower.requires_grad_(True)
            return
        self.tower.requires_grad_(False)
        if trainable_blocks > 0:
            for block in self.tower.blocks[-trainable_blocks:]:
                block.requires_grad_(True)
            self.tower.merger.requires_grad_(True)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, C*tp*p*p], image_grid_thw [I, 3] -> image_embeds [N, out_dim],
        N = sum(t*h*w) / merge**2, images in the order of `image_grid_thw`."""
        merge = self.spatial_merge_size
        if pixel_values.dim() != 2 or pixel_values.shape[1] != self._patch_dim:
            raise ValueError(f"VisionEncoder: pixel_values must be [P, {self._patch_dim}] "
                             f"(C*temporal_patch*patch*patch), got {list(pixel_values.shape)}")
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"VisionEncoder: image_grid_thw must be [I, 3], got {list(image_grid_thw.shape)}")
        num_patches = int(image_grid_thw.prod(-1).sum())
        if num_patches != pixel_values.shape[0]:
            raise ValueError(f"VisionEncoder: image_grid_thw gives {num_patches} patches, pixel_values has "
                             f"{pixel_values.shape[0]}")
        if bool((image_grid_thw[:, 1:] % merge != 0).any()):
            raise ValueError(f"VisionEncoder: image_grid_thw h and w must be multiples of spatial_merge_size={merge}, "
                             f"got {image_grid_thw.tolist()}")
        if self.blank_images:  # the one place every image passes: the model can see none of them
            pixel_values = torch.zeros_like(pixel_values)
        dtype = self.tower.patch_embed.proj.weight.dtype
        if num_patches == 0:  # a text-only batch: the HF tower cannot run on zero patches
            return pixel_values.new_zeros(0, self.out_dim, dtype=dtype)
        out = self.tower(pixel_values.to(dtype), grid_thw=image_grid_thw)
        return out.pooler_output  # [N, out_dim]: merged tokens, already back in raster order per image

    def idle_image(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest image the tower takes, all zeros: one temporal patch of merge x merge
        patches -> pixel_values [merge**2, C*tp*p*p], image_grid_thw [1, 3]; one token out.
        A text-only batch on one of several ranks runs it so that every rank makes the same
        collective calls (`casa.model.VisionLanguageModel.needs_idle_sample`)."""
        merge = self.spatial_merge_size
        pixel_values = torch.zeros(merge * merge, self._patch_dim, device=device)
        return pixel_values, torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` ({model_type, vision_config}) and `model.safetensors` (`visual.*`):
        a vision-only Qwen2.5-VL checkpoint that `VisionEncoder(path=directory)` reads back."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        vision_config = self.tower.config.to_diff_dict()
        vision_config.pop("transformers_version", None)
        (out / "config.json").write_text(json.dumps({"model_type": SAVED_MODEL_TYPE, "vision_config": vision_config},
                                                    indent=2) + "\n")
        state = {f"visual.{k}": v.detach().contiguous() for k, v in self.tower.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
