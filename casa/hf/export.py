"""Writing and reading the Hugging Face `save_pretrained` directory (layout: `casa.hf`).

`experiments.export` reads a checkpoint with the one reader (`casa.assistant.load`:
`casa.checkpoint` + the run config), so every trainer's checkpoint exports the same way, and
hands the parts to `write_export`; weights are written as stored (fp32), the run's precision
is recorded and applied again on load (`read_export`, via `casa.assistant.load(DIR)`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from casa.hf.configuration_casa import CasaConfig
from casa.hf.modeling_casa import CasaForCausalLM

EXPORTED_MODEL_TYPE = CasaConfig.model_type


def is_export_dir(path: str | Path) -> bool:
    """A directory written by `export` (config.json with model_type "casa")?"""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("model_type") == EXPORTED_MODEL_TYPE
    except (OSError, ValueError):
        return False


def self_contained_spec(spec: dict[str, Any], model) -> dict[str, Any]:
    """The run's `model.model` spec with every `path:` (a local pretrained checkpoint the run
    started from) replaced by the architecture the built `model` has: the export holds the
    weights, so rebuilding it must not read (or need) those directories."""
    spec = json.loads(json.dumps(spec))  # a deep copy that is also JSON-clean
    init = spec.setdefault("init_args", {})
    for part, hf_config in (("backbone", model.backbone.config), ("vision", model.vision.tower.config)):
        args = (init.get(part) or {}).get("init_args")
        if not args or args.get("path") is None:
            continue
        fields = hf_config.to_diff_dict()
        if part == "vision":
            from casa.vision import _config_fields

            fields = {k: v for k, v in fields.items() if k in _config_fields()}
        for k in ("architectures", "transformers_version", "model_type", "_name_or_path", "dtype", "torch_dtype"):
            fields.pop(k, None)
        args["path"], args["config"] = None, fields
    return spec


def write_export(out: str | Path, model, tokenizer, template, settings, run_config: dict) -> Path:
    """A loaded run (model, tokenizer, `ChatTemplate`, `DataSettings` and its run config, as
    `casa.assistant.load` rebuilds them) -> the `save_pretrained` directory `out`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from casa.rebuild import run_precision

    out = Path(out)
    config = CasaConfig(model_spec=self_contained_spec(run_config["model"]["model"], model), template=template.name,
                        inference=asdict(settings), run_precision=run_precision(run_config))
    hf = CasaForCausalLM(config, model=model)
    # remote code: save_pretrained copies configuration_casa.py / modeling_casa.py and writes auto_map
    CasaConfig.register_for_auto_class()
    CasaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    hf.save_pretrained(out)
    tokenizer.chat_template = template.jinja()
    tokenizer.save_pretrained(out)
    vision = model.vision.tower.config
    Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
                             patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                             merge_size=vision.spatial_merge_size).save_pretrained(out)
    return out


def read_export(path: str | Path, device: str | torch.device = "cpu"):
    """An export directory -> (model, tokenizer, CasaConfig, (min_pixels, max_pixels)): what
    `casa.assistant.load` rebuilds an Assistant from."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from transformers import AutoTokenizer

    hf = CasaForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    pixels = (int(processor.size["shortest_edge"]), int(processor.size["longest_edge"]))
    # with its config given, AutoTokenizer does not load config.json through AutoConfig (whose
    # auto_map would ask whether to trust DIR's remote code: this is casa's own class)
    tokenizer = AutoTokenizer.from_pretrained(str(path), config=hf.config, local_files_only=True)
    return hf.model.to(device), tokenizer, hf.config, pixels
