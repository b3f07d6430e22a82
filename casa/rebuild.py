"""Rebuilding a model from a checkpoint's stored run config, without the trainer.

`experiments.fit` stores the whole resolved run config (YAML) in every checkpoint
(`checkpoint["casa_config"]`); `read_checkpoint` reads it back as plain data, without
Lightning (or parses the run's YAMLs with the fit CLI's own parser, for a checkpoint written
before); `build_model` builds its `model.model` part, and `DataSettings` /
`run_precision` read what inference needs from its `data:` and `trainer:` parts.
`casa.assistant.load` puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from casa.checkpoint import CheckpointError, read_checkpoint as read_checkpoint_dict
from casa.processing.image import MIN_PIXELS


@dataclass
class DataSettings:
    """What inference needs from the run's `data:` config (tokenizer, template, image sizes).

    `from_config` reads a parsed config, whose values (defaults included) are the datamodule's;
    the defaults here serve direct construction (benchmarks) and equal VideoDataModule's
    (tests/test_export.py checks)."""

    tokenizer: str = "char"
    template: str = "helium"
    max_pixels: int = 896 * 896
    min_pixels: int = MIN_PIXELS
    frame_max_pixels: int = 448 * 448
    fps: float = 2.0
    min_duration: float = 10.0
    min_frames: int = 20
    max_duration: float = 180.0
    max_text_tokens: int = 2048
    max_image_tokens: int = 20480
    val_rows_samples: int = 16
    layout: str = "qa"

    VIDEO_FIELDS = ("frame_max_pixels", "fps", "min_duration", "min_frames", "max_duration", "layout")

    @classmethod
    def from_config(cls, data: dict | None) -> "DataSettings":
        """`data:` of a parsed run config (Image/Video/MixtureDataModule) -> settings; other keys ignored."""
        args = dict((data or {}).get("init_args") or {})
        if "image" in args or "video" in args:  # MixtureDataModule: images from `image`, frames from `video`
            image = dict((args.get("image") or {}).get("init_args") or {})
            video = dict((args.get("video") or {}).get("init_args") or {})
            args = {**image, **{k: v for k, v in video.items() if k in cls.VIDEO_FIELDS}}
        known = {k: v for k, v in args.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)


def read_checkpoint(path: str | Path, config_files: list[str | Path] = ()) -> tuple[dict, dict]:
    """A checkpoint file or directory (`casa.checkpoint.read_checkpoint`) -> (checkpoint dict,
    run config); CheckpointError with a readable reason otherwise.

    The run config is the checkpoint's `casa_config`: the config experiments.fit resolved
    (every value validated, every default filled in, `parser.dump`), stored as plain YAML, so it
    is read back as data, without Lightning or the fit CLI (what inference reads of it,
    `build_model`, `DataSettings`, `run_precision`, fills its own defaults for options added
    since). When `config_files` are given (the YAMLs the run was trained with, composed in
    order: the way to load a checkpoint written before experiments.fit stored its config), they
    are composed and resolved by experiments.fit's own parser (`casa.train.cli.parse_run_config`,
    which imports Lightning)."""
    import yaml

    p = Path(path)
    ckpt = read_checkpoint_dict(p)
    if config_files:
        missing = [str(f) for f in config_files if not Path(f).is_file()]
        if missing:
            raise CheckpointError(f"config file(s) {missing} do not exist")
        from casa.train.cli import parse_run_config

        source = ", ".join(map(str, config_files))
        try:
            return ckpt, parse_run_config([Path(f).read_text() for f in config_files])
        except ValueError as e:
            raise CheckpointError(f"{p}: {source} is not a run config of experiments.fit ({e})") from None
    text = ckpt.get("casa_config")
    if not text:
        raise CheckpointError(f"{p} has no 'casa_config': it was written before experiments.fit stored the run "
                              "config in checkpoints; pass the YAML config(s) it was trained with (--config), or "
                              "re-train with the current experiments.fit")
    try:
        config = text if isinstance(text, dict) else yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{p}: its casa_config is not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{p}: its casa_config is not a run config of experiments.fit (no 'model' section)")
    return ckpt, config


def add_checkpoint_arguments(parser) -> None:
    """The options every inference CLI shares: which checkpoint, its config if the file
    predates `casa_config`, where to run and how many CPU threads."""
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint written by experiments.fit (a file, or the directory FSDP2 writes), "
                             "or a Hugging Face directory written by experiments.export")
    parser.add_argument("--config", action="append", default=[],
                        help="the run's YAML config (repeatable, composed in order) for a checkpoint without casa_config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="run",
                        help="run: the precision the run validated in (bf16-mixed: autocast; bf16-true: bf16 "
                             "parameters, as FSDP2's fsdp_param_dtype); 32 forces fp32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster for tiny models on a busy machine)")


def build_model(configs: "dict | str | Path | list[dict | str | Path]", overrides: list[str] = ()):
    """Run configs -> VisionLanguageModel (random weights), composed as
    `python -m experiments.fit --config a.yaml --config b.yaml --model.model.init_args.x v`
    composes them: jsonargparse's own `--config` composition over the same `model.model`
    argument (typed `VisionLanguageModel`) that `CasaModule` gives the CLI, so a strategy
    YAML that changes `fusion`'s class_path replaces it whole, as in training.

    configs: one run config or a list of them, each a YAML path or a dict (a parsed YAML,
      e.g. a checkpoint's `casa_config`); only their `model.model` part is read.
    overrides: CLI-style arguments on that part, e.g.
      ["--model.model.init_args.fusion.init_args.k", "4"].
    The one way models are built outside `experiments.fit`: checkpoint rebuilding (`load`),
    the benchmarks and `experiments.strategies`."""
    import yaml
    from jsonargparse import ActionConfigFile, ArgumentParser

    from casa.model import VisionLanguageModel

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--model.model", type=VisionLanguageModel)
    args: list[str] = []
    for config in configs if isinstance(configs, (list, tuple)) else [configs]:
        if not isinstance(config, dict):
            config = yaml.safe_load(Path(config).read_text()) or {}
        spec = (config.get("model") or {}).get("model")
        if spec is not None:  # a trainer- or data-only config changes nothing here
            args += ["--config", yaml.safe_dump({"model": {"model": spec}})]
    cfg = parser.parse_args(args + [str(a) for a in overrides])
    if cfg.model.model is None:
        raise ValueError("build_model: no config gives model.model (the VisionLanguageModel spec)")
    return parser.instantiate(cfg).model.model


PRECISIONS = ("run", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
"""Inference precisions: Lightning's names. "-mixed" autocasts (as `precision: bf16-mixed`
trains), "-true" holds the parameters in half precision (as FSDP2's `fsdp_param_dtype` does)."""
HALF = {"bf16": torch.bfloat16, "16": torch.float16}


def run_precision(config: dict) -> str:
    """The precision a run validated in, from its config: FSDP2's `model.fsdp_param_dtype`,
    else `trainer.precision` ("32" when neither asks for half precision)."""
    param = (config.get("model") or {}).get("fsdp_param_dtype")
    # fsdp_param_dtype applies only under ModelParallelStrategy, the one strategy that reads it
    if param in ("bfloat16", "float16") and "ModelParallelStrategy" in str((config.get("trainer") or {}).get("strategy")):
        return {"bfloat16": "bf16-true", "float16": "16-true"}[param]
    trained = str((config.get("trainer") or {}).get("precision") or "32-true")
    trained = {"bf16": "bf16-mixed", "16": "16-mixed"}.get(trained, trained)  # Lightning's short aliases
    return trained if trained in PRECISIONS else "32"


def resolve_precision(precision: str, config: dict, model, device: str | torch.device) -> str:
    """`precision` ("run": the run's own) -> one of PRECISIONS without "run". A model with flash
    attention on CUDA runs in bf16 at least (flash-attn takes fp16/bf16 only)."""
    from casa.attention import half_precision_modules

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    precision = run_precision(config) if precision == "run" else precision
    if precision == "32" and torch.device(device).type == "cuda" and half_precision_modules(model):
        return "bf16-true"
    return precision

