"""The export's model card (README.md): what the model is, how it was trained, what it scored,
how to run it, and what it cannot do (`casa.hf.export.write_export` writes it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

USAGE = '''```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{path}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{path}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.new("RGB", (112, 112), "red")}},
                                         {{"type": "text", "text": "What colour is the shape?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=16)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def run_metrics(ckpt: str | Path | None) -> tuple[dict[str, float], Path | None]:
    """The validation metrics `experiments.fit` wrote for the run of `ckpt` (RUN_DIR/metrics.json,
    next to RUN_DIR/checkpoints/) -> ({name: value} of its val* entries, the file), or ({}, None)."""
    if ckpt is None:
        return {}, None
    p = Path(ckpt).resolve()
    for d in (p.parent, p.parent.parent, p.parent.parent.parent):
        f = d / "metrics.json"
        if f.is_file():
            try:
                metrics = json.loads(f.read_text()).get("metrics") or {}
            except ValueError:
                return {}, f
            return {k: float(v) for k, v in sorted(metrics.items()) if k.startswith("val")}, f
    return {}, None


def _base(part: dict[str, Any]) -> str:
    args = part.get("init_args") or {}
    where = f"weights from `{args['path']}`" if args.get("path") else "randomly initialised from `config`"
    family = f" ({args['family']})" if args.get("family") else ""
    return f"`{part.get('class_path')}`{family}, {where}"


def model_card(run_config: dict, model_spec: dict, global_step: int, ckpt: str | Path | None, precision: str,
               path: str = "DIR") -> str:
    """-> README.md text. run_config: the run's parsed config (training settings and base
    models as trained, `path:` included); model_spec: the exported, self-contained spec."""
    init = (run_config.get("model") or {}).get("model", {}).get("init_args") or {}
    fusion = model_spec["init_args"]["fusion"]
    metrics, source = run_metrics(ckpt)
    trained = {k: run_config[k] for k in ("model", "data", "trainer") if k in run_config}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [casa, vision-language, custom_code]", "---",
        "", "# casa vision-language model", "",
        "Exported by `python -m experiments.export` from a casa run: the model's own source "
        "is in this folder (remote code), so it runs with torch, transformers, safetensors, pillow and numpy "
        "(PyAV for videos), without casa.", "",
        "## Model", "",
        f"- fusion strategy: `{fusion['class_path']}` {json.dumps(fusion.get('init_args') or {})}",
        f"- language model: {_base(init.get('backbone') or {})}",
        f"- vision encoder: {_base(init.get('vision') or {})}",
        f"- projector: `{init.get('projector', 'mlp')}`; trained for {global_step} steps; validated in precision "
        f"`{precision}` (weights stored in float32)", "",
        "## Validation metrics", "",
    ]
    if metrics:
        lines += [f"From `{source.name}` of the run (last validation):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    elif source is not None:
        lines += [f"The run's `{source.name}` holds no validation metric (the run did not validate)."]
    else:
        lines += ["No validation metrics were found next to the checkpoint (`metrics.json` of its run directory)."]
    lines += ["", "## Usage", "", USAGE.format(path=path), "",
              "`pipeline(\"image-text-to-text\", model=DIR, trust_remote_code=True)` works too.", "",
              "## Limits", "",
              "- Greedy and sampled decoding (temperature, top-k, top-p, repetition penalty, n-gram blocking, stop "
              "strings, streamers); beam search is refused: casa's KV cache cannot reorder rows.",
              "- Images and videos are read with the prompt; a generated continuation is text only.",
              "- A video is sampled as in training (its frames, each encoded as an image); PyAV is needed for video files.",
              f"- The run validated in `{precision}`; load with `dtype=torch.bfloat16` to match a bf16 run's numbers.",
              "- attn_implementation: eager, sdpa, flash_attention_2 (flash-attn on CUDA).", "",
              "## Training config", "", "```yaml", yaml.safe_dump(trained, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
