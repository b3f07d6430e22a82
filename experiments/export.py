"""Export a checkpoint to the Hugging Face format.

    python -m experiments.export --ckpt runs/demo/checkpoints/last.ckpt --out runs/demo/hf

CKPT: what `experiments.fit` wrote under any trainer (a .ckpt file, or FSDP2's checkpoint
directory). DIR gets a `save_pretrained` directory (layout in `casa.hf`): config.json,
model.safetensors, the tokenizer with its chat template as Jinja, the image processor with the
run's pixel limits, the processor, generation config, model card and remote code (casa's own
modules, copied), so that

    AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)   (no casa needed)
    AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    casa.assistant.load(DIR)

all load it. Prints the files written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def export(ckpt: str | Path, out: str | Path, config_files: list[str | Path] = ()) -> Path:
    """A checkpoint written by `experiments.fit` (config_files: the run's YAMLs, for a checkpoint
    that predates `casa_config`) -> the `save_pretrained` directory `out`."""
    from casa.assistant import load
    from casa.hf.export import write_export

    a = load(ckpt, config_files=config_files, precision="32")  # the weights as stored
    return write_export(out, a.model, a.tokenizer, a.template, a.settings, a.config, global_step=a.global_step, ckpt=ckpt)


def main(argv: list[str] | None = None) -> int:
    from casa.checkpoint import CheckpointError

    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by experiments.fit (a file, or FSDP2's directory)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--config", action="append", default=[],
                   help="the run's YAML config (repeatable) for a checkpoint without casa_config")
    a = p.parse_args(argv)
    try:
        out = export(a.ckpt, a.out, a.config)
    except CheckpointError as e:
        if os.environ.get("CASA_TRACEBACK"):
            raise
        print(f"experiments.export: error: {e}\n(set CASA_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    for f in sorted(out.iterdir()):
        print(f"{f}  {f.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
