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

from casa.atomic import atomic_directory

from casa.hf.configuration_casa import CasaConfig, class_paths
from casa.hf.modeling_casa import CasaForConditionalGeneration

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


REMOTE_ENTRIES = ["casa.hf.configuration_casa", "casa.hf.modeling_casa", "casa.hf.processing_casa"]
"""The remote code's entry modules (auto_map's); `casa.hf.source` follows their imports."""
MODEL_CLASS = "modeling_casa.CasaForConditionalGeneration"
AUTO_MAP = {"AutoConfig": "configuration_casa.CasaConfig", "AutoModel": MODEL_CLASS,
            "AutoModelForImageTextToText": MODEL_CLASS, "AutoModelForCausalLM": MODEL_CLASS}


def _placeholder_ids(tokenizer) -> tuple[int, int]:
    """The image and video placeholders' ids, added to the tokenizer as special tokens when it
    lacks them (the model takes placeholders out before embedding, so an id past the language
    model's vocabulary is never looked up)."""
    from casa.hf.processing_casa import IMAGE_PAD, VIDEO_PAD

    missing = [t for t in (IMAGE_PAD, VIDEO_PAD) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(IMAGE_PAD), tokenizer.convert_tokens_to_ids(VIDEO_PAD)


def write_export(out: str | Path, model, tokenizer, template, settings, run_config: dict, global_step: int = 0,
                 ckpt: str | Path | None = None) -> Path:
    """A loaded run (model, tokenizer, `ChatTemplate`, `DataSettings` and its run config, as
    `casa.assistant.load` rebuilds them; ckpt: where it came from, for the card's metrics) ->
    the `save_pretrained` directory `out` (layout: `casa.hf`), built aside and renamed into
    place (`casa.atomic.atomic_directory`): a kill or a full disk never leaves a partial export
    under its name, and an export that fails keeps the previous one."""
    with atomic_directory(out) as tmp:
        _write_export(tmp, Path(out), model, tokenizer, template, settings, run_config, global_step, ckpt)
    return Path(out)


def _write_export(out: Path, final: Path, model, tokenizer, template, settings, run_config: dict, global_step: int,
                  ckpt: str | Path | None) -> None:
    """`write_export`'s files, written into `out` (a temporary directory that becomes `final`)."""
    from transformers import GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from casa.hf.card import model_card
    from casa.hf.processing_casa import CasaProcessor
    from casa.hf.source import write_remote_code
    from casa.processing.template import ChatTemplate
    from casa.rebuild import run_precision

    image_id, video_id = _placeholder_ids(tokenizer)
    template = ChatTemplate(template.name, tokenizer)  # the vocabulary may have grown by the placeholders
    spec = self_contained_spec(run_config["model"]["model"], model)
    precision = run_precision(run_config)
    config = CasaConfig(model_spec=spec, template=template.name, inference=asdict(settings), run_precision=precision,
                        image_token_id=image_id, video_token_id=video_id,
                        vocab_size=int(model.backbone.config.vocab_size), dtype="float32")
    config.auto_map = dict(AUTO_MAP)
    stop = list(template.stop_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config.eos_token_id, config.pad_token_id = stop[0], pad
    hf = CasaForConditionalGeneration(config, model=model)
    # generation ends at the template's end-of-turn token, greedy unless asked otherwise
    hf.generation_config = GenerationConfig(eos_token_id=stop if len(stop) > 1 else stop[0], pad_token_id=pad,
                                            bos_token_id=None, do_sample=False, max_new_tokens=256)
    hf.save_pretrained(out)
    tokenizer.padding_side = "left"  # batched prompts end where generation starts
    image_processor = Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
                                               patch_size=model.vision.tower.config.patch_size,
                                               temporal_patch_size=model.vision.tower.config.temporal_patch_size,
                                               merge_size=model.vision.tower.config.spatial_merge_size)
    video = {k: getattr(settings, k) for k in ("fps", "min_duration", "min_frames", "max_duration", "frame_max_pixels")}
    processor = CasaProcessor(image_processor, tokenizer, chat_template=template.jinja(), video_settings=video)
    processor.auto_map = {"AutoProcessor": "processing_casa.CasaProcessor"}
    processor.save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json too: AutoImageProcessor reads it
    write_remote_code(out, REMOTE_ENTRIES, class_paths(spec))
    (out / "README.md").write_text(model_card(run_config, spec, global_step, ckpt, precision, path=str(final)))


def read_export(path: str | Path, device: str | torch.device = "cpu"):
    """An export directory -> (model, tokenizer, CasaConfig, (min_pixels, max_pixels)): what
    `casa.assistant.load` rebuilds an Assistant from."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from transformers import AutoTokenizer

    hf = CasaForConditionalGeneration.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    pixels = (int(processor.size["shortest_edge"]), int(processor.size["longest_edge"]))
    # with its config given, AutoTokenizer does not load config.json through AutoConfig (whose
    # auto_map would ask whether to trust DIR's remote code: this is casa's own class)
    tokenizer = AutoTokenizer.from_pretrained(str(path), config=hf.config, local_files_only=True)
    return hf.model.to(device), tokenizer, hf.config, pixels
