"""Reading what `experiments.fit` writes, under every trainer: one function for every reader.

    ckpt = read_checkpoint("runs/x/checkpoints/last.ckpt")
    ckpt["state_dict"]      {"model.backbone...": Tensor}  full (unsharded) CPU tensors
    ckpt["casa_config"]     the run config (YAML text), see CasaModule.on_save_checkpoint
    ckpt["global_step"], ckpt["hyper_parameters"], ...     what Lightning stores

`fit` writes `last.ckpt` in one of two forms:

    file       (cpu.yaml, ddp.yaml)  torch.save of Lightning's checkpoint dict
    directory  (fsdp2_h100.yaml: ModelParallelStrategy(save_distributed_checkpoint=True))
        last.ckpt/
            .metadata        DCP index: every tensor's shape, dtype and where its shards are
            __0_0.distcp     rank 0's shards of "state_dict" and "optimizer_<i>" (DCP format)
            __1_0.distcp     rank 1's ...
            meta.pt          torch.save of everything else (global_step, loops, casa_config, ...)

A directory is read in one process, without a process group, through DCP's documented
single-process loading (`torch.distributed.checkpoint.load(..., no_dist=True)` into
pre-allocated full-size tensors: DCP assembles each tensor from its shards). Only
"state_dict" is read: the optimizer states (2x the weights under AdamW) stay on disk; an
exact resume (`--ckpt_path`) reads the directory through Lightning.

`python -m experiments.consolidate DIR OUT.ckpt` turns a directory into the file form
(`consolidate` below).

Nothing in a checkpoint runs code: files and `meta.pt` are read with
`torch.load(weights_only=True)` (plain containers, tensors and the `SAFE_GLOBALS` allowlist),
the DCP index `.metadata` with an unpickler that accepts DCP's own metadata classes only, and
DCP's non-tensor entries with `weights_only=True` too. A pickle that wants anything else
(`os.system` in a `__reduce__`) is refused with a one-line `CheckpointError`, before any of it
runs. A checkpoint written by hand with other Python objects in it is converted once, by
someone who trusts it: `python -m experiments.consolidate --trust-pickle OLD.ckpt NEW.ckpt`.

A checkpoint whose weights hold NaN/inf (a diverged run) is refused as well: every reader
(evaluate, export, stream, consolidate, init_from) would otherwise report NaN as a result.

Resuming (`--ckpt_path last`, `resolve_resume`) takes the newest *intact* checkpoint
(`checkpoint_problem`: zip CRCs of a file, shard byte ranges of a directory), moving a damaged
one aside with a warning; writes are atomic (`casa.atomic`, `casa.train.checkpoint_io`).
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

DCP_METADATA = ".metadata"
"""The index torch.distributed.checkpoint writes into a checkpoint directory
(torch.distributed.checkpoint.filesystem._metadata_fn)."""
LIGHTNING_METADATA = "meta.pt"
"""The non-tensor entries Lightning's ModelParallelStrategy.save_checkpoint writes next to
the shards (lightning.fabric.utilities.load._METADATA_FILENAME; a test keeps them equal)."""

SAFE_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
"""What our checkpoints may hold besides what `torch.load(weights_only=True)` accepts by
default (tensors, dicts, lists, numbers, strings): paths (a `Path` given as a hyperparameter,
e.g. `init_from` from Python). Registered with `torch.serialization.add_safe_globals` when this
module is imported, so Lightning's own resume load (`weights_only=True`) accepts them too."""
torch.serialization.add_safe_globals(SAFE_GLOBALS)

CONVERT_HINT = "if you trust the file: python -m experiments.consolidate --trust-pickle {path} NEW.ckpt"


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded (missing file, not a casa checkpoint, no run config,
    code in its pickle, non-finite weights)."""


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A checkpoint directory written by ModelParallelStrategy (DCP shards + meta.pt)."""
    p = Path(path)
    return p.is_dir() and (p / DCP_METADATA).is_file() and (p / LIGHTNING_METADATA).is_file()


def read_checkpoint(path: str | Path, allow_nonfinite: bool = False) -> dict[str, Any]:
    """A checkpoint file or a distributed checkpoint directory -> Lightning's checkpoint dict
    with a full "state_dict" of CPU tensors; CheckpointError with a one-line reason otherwise
    (also for a pickle that wants code, and, unless `allow_nonfinite`, for NaN/inf weights).
    Directories give everything but the optimizer states."""
    p = Path(path)
    if p.is_dir():
        ckpt = _read_distributed(p)
    elif p.is_file():
        ckpt = safe_load(p)
    else:
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a Lightning checkpoint (no 'state_dict')")
    if not allow_nonfinite:
        check_finite(ckpt["state_dict"], str(p))
    return ckpt


def safe_load(source: str | Path | io.BytesIO, name: str | None = None, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of a file -> its object; CheckpointError in one line when
    the pickle wants a global outside the allowlist (nothing of it has run then) or the file is
    not a PyTorch checkpoint."""
    name = name or str(source)
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        wanted = re.search(r"GLOBAL ([\w.]+)", message)
        if wanted:
            raise CheckpointError(f"{name} wants to run code when loaded (its pickle calls {wanted.group(1)}, which is "
                                  f"not allow-listed); refused: checkpoints are loaded with "
                                  f"torch.load(weights_only=True); {CONVERT_HINT.format(path=name)}") from None
        detail = _weights_unpickler_error(message)
        if _is_zip(source):  # a torch checkpoint whose pickle does what a weights-only load refuses
            raise CheckpointError(f"{name} holds objects a weights-only load refuses ({detail}); refused; "
                                  f"{CONVERT_HINT.format(path=name)}") from None
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint (UnpicklingError: {detail})") from None
    except Exception as e:  # zip/EOF errors of a file that is not (or no longer) a torch checkpoint
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{_first_line(str(e))})") from None


def _weights_unpickler_error(message: str) -> str:
    """The reason in torch's (multi-paragraph) weights-only refusal, e.g. "Unsupported operand 110"."""
    tail = message.split("WeightsUnpickler error:", 1)[-1]
    return _first_line(next((ln for ln in tail.splitlines() if ln.strip()), message))


def _is_zip(source) -> bool:
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        return zipfile.is_zipfile(source)
    except OSError:
        return False


def _first_line(text: str, width: int = 200) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= width else line[:width] + "..."


def check_finite(state_dict: dict[str, Any], where: str) -> None:
    """CheckpointError naming the count and the first tensors when floating-point weights hold
    NaN/inf. One fused norm per dtype (`torch._foreach_norm`): NaN and inf propagate into it."""
    names = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return
    norms = torch._foreach_norm([state_dict[k].detach() for k in names])
    finite = torch.stack([n.float() for n in norms]).isfinite()
    if bool(finite.all()):
        return
    # a finite tensor whose squares overflow gives an inf norm: count only tensors holding NaN/inf
    bad = [k for k, ok in zip(names, finite.tolist()) if not ok and not bool(state_dict[k].isfinite().all())]
    if bad:
        raise CheckpointError(f"{where} has non-finite weights: {len(bad)} of {len(names)} tensors hold NaN/inf "
                              f"(e.g. {bad[:3]}); the run diverged, use an earlier checkpoint")


# ------------------------------------------------------------------ distributed (DCP) directories
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
              ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
              ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes `.metadata` with plain `pickle` (and reads it with `pickle.load`, which would
    run any code in it): this unpickler resolves DCP's own metadata classes, torch dtypes,
    layouts and sizes only (Python's documented "restricting globals" pattern)."""

    def find_class(self, module: str, name: str):
        if (module in _DCP_MODULES or (module, name) in _DCP_NAMES
                or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                 torch.memory_format)))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in a DCP index")


def read_dcp_metadata(directory: Path):
    """A DCP directory's `.metadata` -> torch's Metadata, through `_MetadataUnpickler`."""
    path = directory / DCP_METADATA
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "is not allowed" in str(e):
            raise CheckpointError(f"{path} wants to run code when loaded (its pickle calls "
                                  f"{str(e).split()[1]}, which is not allowed in a DCP index); refused") from None
        raise CheckpointError(f"{path}: not a readable DCP index ({_first_line(str(e))})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable DCP index ({type(e).__name__}: {_first_line(str(e))})") from None
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: not a DCP index (a {type(meta).__name__})")
    if getattr(meta, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
        meta.storage_meta = StorageMeta()
    return meta


def _safe_dcp_io(p: Path, allow_partial_load: bool = False):
    """(storage reader, load planner) for `dcp.load` that never unpickles code: the index through
    `read_dcp_metadata`, non-tensor entries (`_extra_state` dicts, ...) with weights_only=True
    (DefaultLoadPlanner.load_bytes uses weights_only=False)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta = read_dcp_metadata(Path(self.path))
            meta.storage_meta.load_id = self.load_id
            return meta

    class SafePlanner(DefaultLoadPlanner):
        refused: CheckpointError | None = None  # DCP wraps what load_bytes raises: kept to re-raise as is

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = safe_load(value, f"{p}: entry {read_item.dest_index.fqn!r}")
            except CheckpointError as e:
                self.refused = e
                raise
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader(p), SafePlanner(allow_partial_load=allow_partial_load)


def _read_distributed(p: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: not caught by `Exception`
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    missing = [n for n in (DCP_METADATA, LIGHTNING_METADATA) if not (p / n).is_file()]
    if missing:
        listing = sorted(c.name for c in p.iterdir())[:8]
        raise CheckpointError(f"{p} is a directory but not a distributed checkpoint: it has no {' / '.join(missing)} "
                              f"(contents: {listing}); a checkpoint is a .ckpt file, or a directory written by "
                              "ModelParallelStrategy with DCP shards, .metadata and meta.pt")
    ckpt = safe_load(p / LIGHTNING_METADATA)
    index = read_dcp_metadata(p)
    # DCP flattens nested containers: "state_dict.model.x.weight" <- ("state_dict", "model.x.weight"),
    # the path being in planner_data. The state to load into is rebuilt from those paths:
    # tensors allocated full-size, other leaves a placeholder that DCP replaces with the stored object.
    state: dict[str, Any] = {}
    for flat, meta in index.state_dict_metadata.items():
        where = (index.planner_data or {}).get(flat)
        if where and where[0] == "state_dict":
            leaf = torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata) else None
            _set_path(state, where, leaf)
    if not state:
        raise CheckpointError(f"{p}: its DCP shards hold no 'state_dict' entries")
    reader, planner = _safe_dcp_io(p)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": that is the intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            load(state, storage_reader=reader, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as e:  # a refused entry, a missing or truncated shard file
            if planner.refused is not None:
                raise planner.refused from None
            raise CheckpointError(f"{p}: cannot read its DCP shards ({type(e).__name__}: {_first_line(str(e))})") from None
    ckpt["state_dict"] = state["state_dict"]
    return ckpt


# ------------------------------------------------------------------ resuming: the newest intact checkpoint
def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not an intact checkpoint (one line), or None when it is. Cheap, no unpickling
    of weights: a file's zip structure and every member's CRC (a truncated or overwritten file
    fails); a directory's DCP index and meta.pt (read safely), that every shard byte range the index
    names is on disk, and its non-tensor entries (read safely: Lightning's resume would unpickle them
    in full)."""
    p = Path(path)
    if p.is_dir():
        if not is_distributed_checkpoint(p):
            return "a directory without DCP .metadata / meta.pt"
        try:
            meta = read_dcp_metadata(p)
        except CheckpointError as e:
            return str(e)
        problem = _zip_problem(p / LIGHTNING_METADATA)
        if problem:
            return f"{LIGHTNING_METADATA}: {problem}"
        try:  # small (no tensors): read it as a reader would
            safe_load(p / LIGHTNING_METADATA)
        except CheckpointError as e:
            return str(e)
        sizes: dict[str, int] = {}
        for info in (meta.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is None:
                continue
            if rel not in sizes:
                sizes[rel] = (p / rel).stat().st_size if (p / rel).is_file() else -1
            if sizes[rel] < info.offset + info.length:
                return f"shard {rel} is missing or truncated"
        return _dcp_objects_problem(p, meta)
    if not p.is_file():
        return "does not exist"
    return _zip_problem(p)


def _dcp_objects_problem(p: Path, meta) -> str | None:
    """Read a DCP directory's non-tensor entries (optimizer hyperparameters, `_extra_state`s)
    safely: Lightning's resume reads them with DCP's planner, which unpickles them with
    `weights_only=False`, so one that wants code is refused here, before."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    state: dict[str, Any] = {}
    for flat, m in meta.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata) and (meta.planner_data or {}).get(flat):
            _set_path(state, meta.planner_data[flat], None)
    if not state:
        return None
    reader, planner = _safe_dcp_io(p, allow_partial_load=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            load(state, storage_reader=reader, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as e:
            return str(planner.refused) if planner.refused is not None else \
                f"its DCP entries cannot be read ({type(e).__name__}: {_first_line(str(e))})"
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"truncated or not a checkpoint ({type(e).__name__}: {_first_line(str(e))})"
    return None if bad is None else f"corrupt member {bad}"


def newest_intact(directory: str | Path, preferred: str = "last.ckpt") -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from in `directory` -> (path or None, [(skipped path, why)]):
    `preferred` when intact, else the most recently written intact `*.ckpt` (file or DCP directory).
    Temporary files of interrupted writes (`casa.atomic`: hidden, `.tmp`) are never candidates."""
    d = Path(directory)
    if not d.is_dir():
        return None, []
    others = sorted((c for c in d.glob("*.ckpt") if c.name != preferred), key=lambda c: c.stat().st_mtime, reverse=True)
    skipped = []
    for c in ([d / preferred] if (d / preferred).exists() else []) + others:
        problem = checkpoint_problem(c)
        if problem is None:
            return c, skipped
        skipped.append((c, problem))
    return None, skipped


def resolve_resume(ckpt_path: str | None, directory: str | Path | None) -> str | None:
    """`--ckpt_path` as `experiments.fit` passes it to Lightning: "last" becomes the newest intact
    checkpoint of the run's checkpoint directory (a warning names each damaged one, moved aside
    to NAME.damaged, and why); a
    path that is not intact is a CheckpointError. None, or "last" with no checkpoint at all
    (Lightning then starts from scratch, with its own warning), pass through."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        problem = checkpoint_problem(ckpt_path)
        if problem is not None:
            raise CheckpointError(f"--ckpt_path {ckpt_path}: {problem}")
        return ckpt_path
    if directory is None:
        return ckpt_path
    found, skipped = newest_intact(directory)
    for path, why in skipped:
        # moved aside (kept to inspect): Lightning would otherwise version the next write of that
        # name ("last-v1.ckpt") and leave the damaged file as the run's newest
        aside = path.with_name(path.name + ".damaged")
        try:
            os.replace(path, aside)
        except OSError:  # another rank moved it first, or a read-only directory
            aside = path
        warnings.warn(f"--ckpt_path last: skipping {path} ({why})" + (f", moved to {aside.name}" if aside != path else ""),
                      stacklevel=2)
    if found is None:
        if skipped:
            raise CheckpointError(f"--ckpt_path last: no intact checkpoint in {directory} "
                                  f"({len(skipped)} damaged: {', '.join(p.name for p, _ in skipped)})")
        return ckpt_path
    if skipped:
        warnings.warn(f"--ckpt_path last: resuming from {found}, the newest intact checkpoint", stacklevel=2)
    return str(found)


def _set_path(root: dict, path: tuple, value: Any) -> None:
    """root[path[0]][path[1]]... = value, creating dicts (str keys) and lists (int keys) on the way."""
    node: Any = root
    for key, nxt in zip(path[:-1], path[1:]):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
        if (node[key] if isinstance(node, list) else node.get(key)) is None:
            node[key] = [] if isinstance(nxt, int) else {}
        node = node[key]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


def consolidate(path: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """A distributed checkpoint directory (or a file) -> one checkpoint file at `out` that
    every reader of a file takes (weights, run config, step; a directory's optimizer states are
    left out), written atomically (`casa.atomic`).

    trust_pickle: the one way to read a checkpoint that holds other Python objects (a file
    written before every load was `weights_only=True`, or by hand): it is unpickled in full
    (its code runs: only for a file you trust), every value is turned into plain data
    (`to_plain_data`) and the result must then load with `weights_only=True`."""
    from casa.atomic import atomic_write

    out = Path(out)
    if out.resolve() == Path(path).resolve():
        raise CheckpointError(f"consolidate: the output {str(out)!r} is the checkpoint itself")
    if trust_pickle and Path(path).is_file():
        try:
            ckpt = to_plain_data(torch.load(path, map_location="cpu", weights_only=False), "checkpoint")
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                                  f"{_first_line(str(e))})") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
        check_finite(ckpt["state_dict"], str(path))
    else:
        ckpt = read_checkpoint(path)
    with atomic_write(out) as f:
        torch.save(ckpt, f)
    safe_load(out)  # what was written is what every reader accepts
    return out


def to_plain_data(obj: Any, where: str) -> Any:
    """A loaded object -> the same made of what `torch.load(weights_only=True)` accepts: dicts,
    lists, tuples, numbers, strings, None, tensors and `SAFE_GLOBALS`; dataclasses, namespaces
    (anything with a `__dict__` of plain data, e.g. jsonargparse's Namespace) become dicts.
    CheckpointError naming the key path of a value that cannot be made plain."""
    import dataclasses

    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype,
                                       torch.device, torch.Size, *SAFE_GLOBALS)):
        return obj
    if isinstance(obj, dict):  # an OrderedDict stays one (weights_only accepts it); other dict types become dicts
        cls = collections.OrderedDict if isinstance(obj, collections.OrderedDict) else dict
        return cls((k, to_plain_data(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [to_plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain_data(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if hasattr(obj, "__dict__") and not callable(obj):
        return {k: to_plain_data(v, f"{where}.{k}") for k, v in vars(obj).items()}
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which cannot be turned "
                          "into plain data (dicts, lists, numbers, strings, tensors)")
