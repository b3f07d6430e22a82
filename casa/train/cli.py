"""The command line of `experiments.fit`, as the one reader of a run config.

`RunCLI` is the LightningCLI over `CasaModule` and any `LightningDataModule` (subclass mode)
with casa's extra top-level options; `experiments.fit` runs it (`CasaCLI`), and
`parse_run_config` parses with exactly its parser, without instantiating anything: a stored
run config (a checkpoint's `casa_config`) or the run's YAMLs composed in order, each value
validated and every default filled in as training saw it. `casa.rebuild.read_checkpoint`
reads checkpoints through it; there is no hand-written config merge.
"""

from __future__ import annotations

from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from casa.train.module import CasaModule


@dataclass
class SynthSpec:
    """The synthetic benchmark to generate before training (see data.synth)."""

    out: str = "runs/synth"
    seed: int = 0
    train: int = 4000
    val: int = 200
    test: int = 200
    tasks: list[str] = field(default_factory=list)


CLI_ARGS = dict(model_class=CasaModule, datamodule_class=L.LightningDataModule, subclass_mode_data=True,
                auto_configure_optimizers=False)
"""The LightningCLI arguments that define the run config's schema (experiments.fit passes these)."""


class RunCLI(LightningCLI):
    """LightningCLI(**CLI_ARGS) + --synth, --run_dir, --ckpt_path."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--synth", type=SynthSpec | None, default=None,
                            help="generate the synthetic benchmark first (skipped when already there)")
        parser.add_argument("--run_dir", type=str | None, default=None, help="run directory (checkpoints, logs, metrics)")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help='resume from a checkpoint file, or "last" for the run\'s last checkpoint')


class _ParseOnly(RunCLI):
    """RunCLI that stops after parsing: nothing is built, no RNG is seeded."""

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI's own version warns when the process has argv of its own (any CLI calling us)
        self.config = parser.parse_args(args)

    def _set_seed(self) -> None:
        """Reading a config must not reseed the caller's random number generators."""

    def instantiate_classes(self) -> None:
        """Nothing is instantiated: the caller builds what it needs (`casa.rebuild.build_model`)."""


def _is_file(c: "str | Path") -> bool:
    """A path to an existing file (a long YAML text is not a path: the OS rejects the name)?"""
    try:
        return Path(c).is_file()
    except OSError:
        return False


def parse_run_config(configs: "list[str | Path | dict]") -> dict:
    """Run configs (YAML paths, YAML texts or dicts), composed in order as
    `python -m experiments.fit --config a.yaml --config b.yaml` composes them -> the parsed run
    config (a dict: every default filled in, components as class_path + init_args).
    ValueError with the parser's message when a value is invalid or a required one missing."""
    import yaml

    args: list[str] = []
    for c in configs:
        args += ["--config", yaml.safe_dump(c) if isinstance(c, dict) else
                 Path(c).read_text() if _is_file(c) else str(c)]
    try:
        cli = _ParseOnly(**CLI_ARGS, args=args, run=False, load_from_checkpoint_support=False,
                         parser_kwargs={"exit_on_error": False})
    except (ArgumentError, SystemExit) as e:
        raise ValueError(f"the run config does not parse with experiments.fit's parser: {e}") from None
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_validation=True))
