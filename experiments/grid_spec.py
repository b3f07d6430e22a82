"""The grid file of `experiments.grid`: its schema, its validation and its expansion into runs.

    description: text                        # optional, copied into results.md
    base: [a.yaml, b.yaml]                   # config files of every run, composed in order
    overrides: {trainer.max_steps: 300}      # dotted overrides of every run (optional)
    axes:                                    # one or more; runs = their cartesian product
      - name: fusion
        values:                              # labels: letters, digits, _ . + (unique per axis)
          - {label: casa_plus, configs: [experiments/configs/strategies/casa_plus.yaml]}
          - {label: k4, overrides: {model.model.init_args.fusion.init_args.k: 4}}
      - name: seed
        values: [{label: s0, overrides: {seed_everything: 0}}, {label: s1, overrides: {seed_everything: 1}}]
      - name: fusion                         # or: strategies of the matrix (experiments.strategies),
        strategies: all                      # `all` or a list of names; each becomes
                                             # {label: <name>, configs: [strategies/<name>.yaml]}
    aggregate: seed                          # optional: an axis whose runs are repeats (seeds);
                                             # results add mean ± std over it per other-axes combination

A run is named by its labels joined with "-" (first axis first) and passes to
`experiments.fit`: the base configs, the values' configs, the common overrides, then the
values' overrides (the more specific wins). Config paths are relative to the working
directory, as on the fit command line. Every error names the field, the bad value and the
valid choices.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GRID_KEYS = ("description", "base", "overrides", "axes", "aggregate")
AXIS_KEYS = ("name", "values", "strategies")
VALUE_KEYS = ("label", "configs", "overrides")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+]*")  # "-" joins labels into run names
DOTTED = re.compile(r"[A-Za-z_]\w*(\.\w+)*")
RESERVED = {"run_dir": "the grid sets it (--out DIR/<run>)", "config": "list config files under `configs`"}


class GridError(ValueError):
    """A malformed grid file or command line; the message names the field, value and choices."""


@dataclass(frozen=True)
class Value:
    """One labelled value of an axis: extra config files and/or dotted overrides."""

    label: str
    configs: list[str]
    overrides: list[tuple[str, Any]]


@dataclass(frozen=True)
class Run:
    """One combination: its name, the label it takes on each axis, and what it passes to fit."""

    name: str
    labels: dict[str, str]
    configs: list[str]
    overrides: list[tuple[str, Any]]

    def args(self, run_dir: Path) -> list[str]:
        """The `experiments.fit` arguments of this run."""
        args = [a for c in self.configs for a in ("--config", c)]
        for key, value in self.overrides:
            # fit parses every value as YAML, like a value typed on the command line
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return args + ["--run_dir", str(run_dir)]


@dataclass
class Grid:
    path: Path
    description: str
    base: list[str]
    overrides: list[tuple[str, Any]]
    axes: list[tuple[str, list[Value]]]  # (axis name, its values)
    aggregate: str | None = None  # an axis of repeats (seeds): results also averaged over it

    def runs(self) -> list[Run]:
        """The cartesian product of the axes, first axis slowest."""
        runs = []
        for combo in itertools.product(*(values for _, values in self.axes)):
            runs.append(Run(name="-".join(v.label for v in combo),
                            labels={name: v.label for (name, _), v in zip(self.axes, combo)},
                            configs=self.base + [c for v in combo for c in v.configs],
                            overrides=self.overrides + [o for v in combo for o in v.overrides]))
        return runs


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML mapping that names a key twice is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if dup:
            raise GridError(f"line {node.start_mark.line + 1}: key(s) {dup} given twice in one mapping")
        return super().construct_mapping(node, deep=deep)


def _keys(where: str, obj: Any, valid: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise GridError(f"{where}: expected a mapping with keys {list(valid)}, got {obj!r}")
    unknown = [k for k in obj if k not in valid]
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; valid keys: {list(valid)}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise GridError(f"{where}: missing key(s) {missing}")
    return obj


def _configs(where: str, value: Any) -> list[str]:
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise GridError(f"{where}: expected a config file or a list of them, got {value!r}")
    for f in files:
        if not Path(f).is_file():
            raise GridError(f"{where}: config file {f!r} does not exist (paths are relative to the working "
                            f"directory {Path.cwd()})")
    return list(files)


def _overrides(where: str, value: Any) -> list[tuple[str, Any]]:
    if not isinstance(value, dict):
        raise GridError(f"{where}: expected a mapping of dotted keys to values "
                        f"(e.g. {{trainer.max_steps: 300}}), got {value!r}")
    for key in value:
        if not isinstance(key, str) or not DOTTED.fullmatch(key):
            raise GridError(f"{where}: {key!r} is not a dotted config key like 'trainer.max_steps'")
        if key in RESERVED:
            raise GridError(f"{where}: {key!r} cannot be overridden here: {RESERVED[key]}")
    return list(value.items())


def _values(where: str, axis: str, raw: Any) -> list[Value]:
    if not isinstance(raw, list) or not raw:
        raise GridError(f"{where}: axis {axis!r} needs a non-empty list of {{label, configs, overrides}}, got {raw!r}")
    values: list[Value] = []
    for j, value in enumerate(raw):
        vwhere = f"{where}[{j}]"
        value = _keys(vwhere, value, VALUE_KEYS, ("label",))
        label = value["label"]
        label = str(label) if isinstance(label, (str, int)) and not isinstance(label, bool) else label
        if not isinstance(label, str) or not LABEL.fullmatch(label):
            raise GridError(f"{vwhere}.label: {label!r} must be letters, digits, '_', '.' or '+' "
                            f"(run names join labels with '-')")
        seen = [v.label for v in values]
        if label in seen:
            raise GridError(f"{vwhere}.label: duplicate label {label!r} in axis {axis!r}; labels so far: {seen}")
        values.append(Value(label, _configs(f"{vwhere}.configs", value.get("configs") or []),
                            _overrides(f"{vwhere}.overrides", value.get("overrides") or {})))
    return values


def _strategy_values(where: str, chosen: Any) -> list[dict[str, Any]]:
    """`all` or a list of matrix names -> the axis values running those strategies' YAMLs."""
    from experiments import strategies

    names = strategies.names()
    if chosen == "all":
        chosen = names
    if not isinstance(chosen, list) or not chosen or not all(isinstance(n, str) for n in chosen):
        raise GridError(f"{where}: expected 'all' or a non-empty list of strategy names from {names}, got {chosen!r}")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise GridError(f"{where}: {unknown} not in the strategy matrix ({strategies.STRATEGY_DIR}); choose from {names}")
    out = []
    for n in chosen:
        path = strategies.strategy(n).path
        # relative to the working directory when inside it, as hand-written grid paths are
        rel = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        out.append({"label": n, "configs": [str(rel)]})
    return out


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file; every error names the field, the bad value and the choices."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except GridError as e:
        raise GridError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML: {e}") from None
    raw = _keys(str(path), raw, GRID_KEYS, ("base", "axes"))
    base = _configs(f"{path}: base", raw["base"])
    overrides = _overrides(f"{path}: overrides", raw.get("overrides") or {})
    axes_raw = raw["axes"]
    if not isinstance(axes_raw, list) or not axes_raw:
        raise GridError(f"{path}: axes: expected a non-empty list of {{name, values}}, got {axes_raw!r}")
    axes, names = [], []
    for i, axis in enumerate(axes_raw):
        where = f"{path}: axes[{i}]"
        axis = _keys(where, axis, AXIS_KEYS, ("name",))
        name = axis["name"]
        if not isinstance(name, str) or not DOTTED.fullmatch(name) or "." in name:
            raise GridError(f"{where}.name: {name!r} is not a name like 'fusion' (letters, digits, _)")
        if name in names:
            raise GridError(f"{where}.name: duplicate axis name {name!r}; axes so far: {names}")
        names.append(name)
        if ("values" in axis) == ("strategies" in axis):
            raise GridError(f"{where}: axis {name!r} needs exactly one of 'values' or 'strategies', got {sorted(axis)}")
        raw_values = axis["values"] if "values" in axis else _strategy_values(f"{where}.strategies", axis["strategies"])
        axes.append((name, _values(f"{where}.values", name, raw_values)))
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise GridError(f"{path}: description: expected text, got {description!r}")
    aggregate = raw.get("aggregate")
    if aggregate is not None and aggregate not in names:
        raise GridError(f"{path}: aggregate: {aggregate!r} is not an axis of this grid; axes: {names}")
    return Grid(path, description.strip(), base, overrides, axes, aggregate)


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs whose names match one of the `only` names or glob patterns (all without)."""
    if not only:
        return runs
    for pattern in only:
        if not any(fnmatch.fnmatchcase(r.name, pattern) for r in runs):
            raise GridError(f"--only: {pattern!r} matches no run; runs: {[r.name for r in runs]}")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in only)]
