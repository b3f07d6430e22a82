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
    compare: {baseline: insertion}           # optional: paired contrasts (experiments.contrasts) of every
                                             # arm against the baseline, or a list of [a, b] pairs (a - b);
                                             # an arm is a combination of the axes other than `aggregate`
    margin: 2                                # optional: equivalence margin in points (|a - b| < margin)
    slurm: {partition: gpu, account: proj, nodes: 1, gpus_per_node: 8, time: 240}
                                             # optional: resources of `--launcher slurm` (SlurmSpec)
    wandb: {project: casa, mode: offline}    # optional: also log every run to Weights & Biases
                                             # (WandbSpec): group = the grid's name, tags = labels

A run is named by its labels joined with "-" (first axis first) and passes to
`experiments.fit`: the base configs, the values' configs, the common overrides, then the
values' overrides (the more specific wins). Config paths are relative to the working
directory, as on the fit command line. The file is parsed by jsonargparse against the
dataclasses GridSpec / AxisSpec / ValueSpec (the schema), as the fit configs are; every error
names the field, the bad value and the valid choices (keys, strategy names).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from experiments import strategies

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+]*")  # "-" joins labels into run names
DOTTED = re.compile(r"[A-Za-z_]\w*(\.\w+)*")
RESERVED = {"run_dir": "the grid sets it (--out DIR/<run>)", "config": "list config files under `configs`"}


class GridError(ValueError):
    """A malformed grid file or command line; the message names the field, value and choices."""


# ---------------------------------------------------------------------------- the schema
# The grid file's keys and their types, parsed by jsonargparse as the fit configs are: a key
# that is not a field, a missing required field or a value of the wrong type is rejected by
# the parser (kw_only keeps the fields in the file's documented order). jsonargparse names an
# unknown key but not the valid ones, so `_check_keys` walks these same dataclasses first to
# say where the key is and which keys that mapping takes. What a type cannot say (labels
# unique per axis, config files exist, `aggregate` names an axis) is checked after parsing.
# the matrix's names (experiments/configs/strategies/*.yaml), so a wrong one is told the choices
StrategyName = Literal[tuple(strategies.names())]


@dataclass(kw_only=True)
class ValueSpec:
    """One labelled value of an axis (`{label, configs, overrides}`)."""

    label: Union[str, int]
    configs: Union[str, list[str]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class AxisSpec:
    """One axis: its name and exactly one of `values` or `strategies` (`all` or matrix names)."""

    name: str
    values: Optional[list[ValueSpec]] = None
    strategies: Union[Literal["all"], list[StrategyName], None] = None


@dataclass(kw_only=True)
class SlurmSpec:
    """Where `--launcher slurm` submits each run (one SLURM job per run, through submitit);
    the command line's --partition, --nodes, ... override these."""

    partition: Optional[str] = None
    account: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0  # each node runs one task per GPU (Lightning's SLURM environment)
    cpus_per_task: Optional[int] = None
    time: int = 60  # minutes per job; a preempted or timed-out job is requeued and resumes
    additional: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {qos: high}


@dataclass(kw_only=True)
class WandbSpec:
    """Weights & Biases tracking of every run: Lightning's WandbLogger beside the config's own
    loggers, with the grid's name as the W&B group and the run's labels as its tags (its
    hyperparameters hold the labels too, as TensorBoard's do). `offline` writes under
    RUN_DIR/wandb for a later `wandb sync`; the WANDB_MODE environment variable overrides it."""

    project: str = "casa"
    entity: Optional[str] = None
    mode: Literal["online", "offline"] = "online"


@dataclass(kw_only=True)
class CompareSpec:
    """`compare: {baseline: NAME}`: every other arm against NAME (arm - NAME)."""

    baseline: str


@dataclass(kw_only=True)
class GridSpec:
    """A grid file."""

    description: str = ""
    base: Union[str, list[str]]
    overrides: dict[str, Any] = field(default_factory=dict)
    axes: list[AxisSpec]
    aggregate: Optional[str] = None
    compare: Union[CompareSpec, list[list[str]], None] = None
    margin: Optional[float] = None
    slurm: Optional[SlurmSpec] = None
    wandb: Optional[WandbSpec] = None


def _item_dataclass(tp: Any) -> type | None:
    """The dataclass a field holds a list of (`Optional[list[AxisSpec]]` -> AxisSpec), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    if typing.get_origin(tp) is Union:
        return next((c for a in args if (c := _item_dataclass(a)) is not None), None)
    return None


def _check_keys(where: str, raw: Any, cls: type, at: str = "") -> None:
    """Unknown and missing keys of `raw` against the dataclass `cls`, recursively, naming the
    position (`axes[0].values[1]`) and the keys that mapping takes."""
    here = f"{where}: {at}" if at else where
    valid = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(raw, dict):
        raise GridError(f"{here}: expected a mapping with keys {valid}, got {raw!r}")
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise GridError(f"{here}: unknown key(s) {unknown}; valid keys: {valid}")
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in raw]
    if missing:
        raise GridError(f"{here}: missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    for name in valid:
        item = _item_dataclass(hints[name])
        if item is not None and isinstance(raw.get(name), list):
            for i, x in enumerate(raw[name]):
                _check_keys(where, x, item, f"{at}.{name}[{i}]" if at else f"{name}[{i}]")
        union = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is Union else ()
        one = next((a for a in (hints[name], *union) if dataclasses.is_dataclass(a)), None)  # `slurm:`
        if one is not None and isinstance(raw.get(name), dict):  # `compare:` may be a list instead
            _check_keys(where, raw[name], one, f"{at}.{name}" if at else name)


def _parse_schema(where: str, raw: Any) -> GridSpec:
    """`raw` (the loaded YAML) -> GridSpec through jsonargparse; errors name the field."""
    from jsonargparse import ArgumentParser
    from jsonargparse import ArgumentError

    _check_keys(where, raw, GridSpec)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--grid", type=GridSpec)
    try:
        return parser.instantiate(parser.parse_object({"grid": raw})).grid
    except ArgumentError as e:
        # "Parser key "grid.axes": ..." -> the grid file's own field names
        message = str(e).replace('"grid.', '"').replace("Group 'grid'", "the grid file")
        raise GridError(f"{where}: {message}") from None


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
    env: tuple[tuple[str, str], ...] = ()  # environment of its fit process (CASA_GRID_WANDB)

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
    slurm: SlurmSpec = field(default_factory=SlurmSpec)  # `--launcher slurm` resources
    wandb: WandbSpec | None = None  # Weights & Biases tracking of every run
    contrasts: list[tuple[str, str]] = field(default_factory=list)  # (a, b): arm a - arm b, paired
    margin: float | None = None  # equivalence margin, in points

    def arms(self) -> list[str]:
        """The combinations of the axes other than `aggregate`, "-"-joined, in grid order: what
        a contrast compares (its runs over the `aggregate` axis are its seeds)."""
        others = [values for name, values in self.axes if name != self.aggregate]
        return ["-".join(v.label for v in combo) or "all" for combo in itertools.product(*others)]

    def runs(self) -> list[Run]:
        """The cartesian product of the axes, first axis slowest."""
        runs = []
        for combo in itertools.product(*(values for _, values in self.axes)):
            labels = {name: v.label for (name, _), v in zip(self.axes, combo)}
            runs.append(Run(name="-".join(v.label for v in combo), labels=labels,
                            configs=self.base + [c for v in combo for c in v.configs],
                            overrides=self.overrides + [o for v in combo for o in v.overrides],
                            env=self._tracker_env(labels)))
        return runs

    def _tracker_env(self, labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
        """CASA_GRID_WANDB for `experiments.fit`, which adds the WandbLogger (`add_wandb_logger`)."""
        if self.wandb is None:
            return ()
        spec = {**dataclasses.asdict(self.wandb), "group": self.path.stem, "tags": list(labels.values())}
        return (("CASA_GRID_WANDB", json.dumps(spec)),)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML mapping that names a key twice is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if dup:
            raise GridError(f"line {node.start_mark.line + 1}: key(s) {dup} given twice in one mapping")
        return super().construct_mapping(node, deep=deep)


def _configs(where: str, value: str | list[str]) -> list[str]:
    files = [value] if isinstance(value, str) else value  # the schema typed it
    for f in files:
        if not Path(f).is_file():
            raise GridError(f"{where}: config file {f!r} does not exist (paths are relative to the working "
                            f"directory {Path.cwd()})")
    return list(files)


def _overrides(where: str, value: dict[str, Any]) -> list[tuple[str, Any]]:
    for key in value:  # the schema typed it a mapping with string keys
        if not DOTTED.fullmatch(key):
            raise GridError(f"{where}: {key!r} is not a dotted config key like 'trainer.max_steps'")
        if key in RESERVED:
            raise GridError(f"{where}: {key!r} cannot be overridden here: {RESERVED[key]}")
    return list(value.items())


def _values(where: str, axis: str, specs: list[ValueSpec]) -> list[Value]:
    if not specs:
        raise GridError(f"{where}: axis {axis!r} needs a non-empty list of {{label, configs, overrides}}, got []")
    values: list[Value] = []
    for j, spec in enumerate(specs):
        vwhere = f"{where}[{j}]"
        label = str(spec.label)  # `label: 1` is the run-name part "1"
        if not LABEL.fullmatch(label):
            raise GridError(f"{vwhere}.label: {label!r} must be letters, digits, '_', '.' or '+' "
                            f"(run names join labels with '-')")
        seen = [v.label for v in values]
        if label in seen:
            raise GridError(f"{vwhere}.label: duplicate label {label!r} in axis {axis!r}; labels so far: {seen}")
        values.append(Value(label, _configs(f"{vwhere}.configs", spec.configs),
                            _overrides(f"{vwhere}.overrides", spec.overrides)))
    return values


def _strategy_values(where: str, chosen: str | list[str]) -> list[ValueSpec]:
    """`all` or a list of matrix names -> the axis values running those strategies' YAMLs."""
    names = strategies.names()
    chosen = names if chosen == "all" else chosen
    if not chosen:
        raise GridError(f"{where}: expected 'all' or a non-empty list of strategy names from {names}, got []")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise GridError(f"{where}: {unknown} not in the strategy matrix ({strategies.STRATEGY_DIR}); choose from {names}")
    out = []
    for n in chosen:
        path = strategies.strategy(n).path
        # relative to the working directory when inside it, as hand-written grid paths are
        rel = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        out.append(ValueSpec(label=n, configs=[str(rel)]))
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
    spec = _parse_schema(str(path), raw)
    base = _configs(f"{path}: base", spec.base)
    overrides = _overrides(f"{path}: overrides", spec.overrides)
    if not spec.axes:
        raise GridError(f"{path}: axes: expected a non-empty list of {{name, values}}, got []")
    axes, names = [], []
    for i, axis in enumerate(spec.axes):
        where = f"{path}: axes[{i}]"
        name = axis.name
        if not DOTTED.fullmatch(name) or "." in name:
            raise GridError(f"{where}.name: {name!r} is not a name like 'fusion' (letters, digits, _)")
        if name in names:
            raise GridError(f"{where}.name: duplicate axis name {name!r}; axes so far: {names}")
        names.append(name)
        given = sorted(k for k in ("name", "values", "strategies") if getattr(axis, k) is not None)
        if (axis.values is None) == (axis.strategies is None):
            raise GridError(f"{where}: axis {name!r} needs exactly one of 'values' or 'strategies', got {given}")
        specs = axis.values if axis.values is not None else _strategy_values(f"{where}.strategies", axis.strategies)
        axes.append((name, _values(f"{where}.values", name, specs)))
    if spec.aggregate is not None and spec.aggregate not in names:
        raise GridError(f"{path}: aggregate: {spec.aggregate!r} is not an axis of this grid; axes: {names}")
    grid = Grid(path, spec.description.strip(), base, overrides, axes, spec.aggregate, spec.slurm or SlurmSpec(),
                spec.wandb)
    grid.contrasts = _contrasts(f"{path}: compare", spec.compare, grid.arms())
    if spec.margin is not None and not spec.margin > 0:
        raise GridError(f"{path}: margin: {spec.margin!r} must be a positive number of points (e.g. 2)")
    if spec.margin is not None and not grid.contrasts:
        raise GridError(f"{path}: margin: {spec.margin!r} is given but no `compare:` declares contrasts")
    grid.margin = spec.margin
    return grid


def _contrasts(where: str, compare: CompareSpec | list[list[str]] | None, arms: list[str]) -> list[tuple[str, str]]:
    """`compare:` -> [(a, b)] over the grid's arms; every name must be an arm."""
    if compare is None:
        return []
    if isinstance(compare, CompareSpec):
        if compare.baseline not in arms:
            raise GridError(f"{where}.baseline: {compare.baseline!r} is not an arm of this grid; arms: {arms}")
        return [(a, compare.baseline) for a in arms if a != compare.baseline]
    if not compare:
        raise GridError(f"{where}: expected {{baseline: ARM}} or a non-empty list of [a, b] pairs, got []")
    pairs = []
    for i, pair in enumerate(compare):
        if len(pair) != 2 or pair[0] == pair[1]:
            raise GridError(f"{where}[{i}]: {pair!r} must be two different arms [a, b] (a - b); arms: {arms}")
        bad = [a for a in pair if a not in arms]
        if bad:
            raise GridError(f"{where}[{i}]: {bad} not an arm of this grid; arms: {arms}")
        if tuple(pair) in pairs:
            raise GridError(f"{where}[{i}]: {pair!r} is declared twice")
        pairs.append(tuple(pair))
    return pairs


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs whose names match one of the `only` names or glob patterns (all without)."""
    if not only:
        return runs
    for pattern in only:
        if not any(fnmatch.fnmatchcase(r.name, pattern) for r in runs):
            raise GridError(f"--only: {pattern!r} matches no run; runs: {[r.name for r in runs]}")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in only)]
