"""The strategy matrix: every fusion strategy the experiments compare, one YAML each.

Each file `experiments/configs/strategies/<name>.yaml` is a config override that composes
on any run config (`--config demo.yaml --config strategies/<name>.yaml`) and sets
`model.model.init_args.fusion` (class_path + init_args). The directory IS the matrix:
the tests parametrise over it, the benchmarks run it, the docs point to it. A new
strategy enters all of them with one new YAML file; nothing else lists strategies.

    matrix()                      {name: Strategy(name, path, fusion spec)}, sorted by name
    names()                       the matrix's names
    build_fusion("casa_plus")     a FusionStrategy instance, parsed by jsonargparse as the CLI parses it
    fusion_class("casa_plus")     the class it instantiates (casa.fusion.CASA)
    build_model([base, "casa_plus"])   casa.rebuild.build_model with strategy names resolved
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGY_DIR = Path(__file__).resolve().parent / "configs" / "strategies"


@dataclass(frozen=True)
class Strategy:
    """One row of the matrix: its name (the file stem), its YAML and its fusion spec."""

    name: str
    path: Path
    fusion: dict[str, Any] = field(hash=False)
    """{"class_path": ..., "init_args": {...}}: `model.model.init_args.fusion` of the YAML."""


def load_matrix(directory: str | Path = STRATEGY_DIR) -> dict[str, Strategy]:
    """Every `*.yaml` of `directory` -> {name: Strategy}, sorted by name. A file without a
    `model.model.init_args.fusion.class_path` is an error naming the file."""
    import yaml

    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ValueError(f"strategy matrix: no *.yaml in {directory}")
    out = {}
    for path in files:
        config = yaml.safe_load(path.read_text()) or {}
        try:
            fusion = config["model"]["model"]["init_args"]["fusion"]
            fusion["class_path"]
        except (KeyError, TypeError):
            raise ValueError(f"strategy matrix: {path} does not set model.model.init_args.fusion.class_path") from None
        out[path.stem] = Strategy(path.stem, path, {"class_path": fusion["class_path"],
                                                    "init_args": dict(fusion.get("init_args") or {})})
    return out


@functools.cache
def matrix() -> dict[str, Strategy]:
    """The matrix of `STRATEGY_DIR` (read once per process)."""
    return load_matrix(STRATEGY_DIR)


def names() -> list[str]:
    """The strategy names, sorted: what tests parametrise over and benchmarks run."""
    return list(matrix())


def strategy(name: str) -> Strategy:
    """The matrix row `name`; ValueError listing the valid names otherwise."""
    rows = matrix()
    if name not in rows:
        raise ValueError(f"strategy {name!r} is not in the matrix ({STRATEGY_DIR}): choose from {list(rows)}")
    return rows[name]


def fusion_spec(name: str, **init_args: Any) -> dict[str, Any]:
    """The fusion spec of `name` with `init_args` overriding its YAML's (a benchmark variant)."""
    spec = strategy(name).fusion
    return {"class_path": spec["class_path"], "init_args": {**spec["init_args"], **init_args}}


def fusion_class(name: str) -> type:
    """The FusionStrategy subclass `name` instantiates (its class_path, imported)."""
    import importlib

    module, _, cls = strategy(name).fusion["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)


def build_fusion(name: str, **init_args: Any):
    """A fresh `FusionStrategy` for `name`, parsed and instantiated by jsonargparse as the CLI
    does (the YAML is the schema: a wrong init_arg fails with its name and the choices)."""
    from jsonargparse import ArgumentParser

    from casa.fusion import FusionStrategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--fusion", type=FusionStrategy)
    return parser.instantiate(parser.parse_object({"fusion": fusion_spec(name, **init_args)})).fusion


def build_model(configs: list[str | Path | dict], overrides: list[str] = ()):
    """`casa.rebuild.build_model` where a bare strategy name in `configs` stands for its
    YAML: `build_model(["experiments/configs/demo.yaml", "casa_plus"])`."""
    from casa.rebuild import build_model as build

    return build([strategy(c).path if isinstance(c, str) and not c.endswith((".yaml", ".yml")) else c
                  for c in configs], overrides)
