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
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

DCP_METADATA = ".metadata"
"""The index torch.distributed.checkpoint writes into a checkpoint directory
(torch.distributed.checkpoint.filesystem._metadata_fn)."""
LIGHTNING_METADATA = "meta.pt"
"""The non-tensor entries Lightning's ModelParallelStrategy.save_checkpoint writes next to
the shards (lightning.fabric.utilities.load._METADATA_FILENAME; a test keeps them equal)."""


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded (missing file, not a casa checkpoint, no run config)."""


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A checkpoint directory written by ModelParallelStrategy (DCP shards + meta.pt)."""
    p = Path(path)
    return p.is_dir() and (p / DCP_METADATA).is_file() and (p / LIGHTNING_METADATA).is_file()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file or a distributed checkpoint directory -> Lightning's checkpoint dict
    with a full "state_dict" of CPU tensors; CheckpointError with a readable reason otherwise.

    Files are read with `torch.load(weights_only=False)` (they hold the run's hyperparameters
    and config, not only tensors). Directories give everything but the optimizer states."""
    p = Path(path)
    if p.is_dir():
        ckpt = _read_distributed(p)
    elif p.is_file():
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # pickle/zip errors of a file that is not a torch checkpoint
            raise CheckpointError(f"{p} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    else:
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def _read_distributed(p: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    missing = [n for n in (DCP_METADATA, LIGHTNING_METADATA) if not (p / n).is_file()]
    if missing:
        listing = sorted(c.name for c in p.iterdir())[:8]
        raise CheckpointError(f"{p} is a directory but not a distributed checkpoint: it has no {' / '.join(missing)} "
                              f"(contents: {listing}); a checkpoint is a .ckpt file, or a directory written by "
                              "ModelParallelStrategy with DCP shards, .metadata and meta.pt")
    try:
        ckpt = torch.load(p / LIGHTNING_METADATA, map_location="cpu", weights_only=False)
        index = FileSystemReader(p).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{p}: cannot read its checkpoint metadata ({type(e).__name__}: {e})") from None
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
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": that is the intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        load(state, checkpoint_id=p, no_dist=True)
    ckpt["state_dict"] = state["state_dict"]
    return ckpt


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


def consolidate(path: str | Path, out: str | Path) -> Path:
    """A distributed checkpoint directory (or a file) -> one checkpoint file at `out` that
    every reader of a file takes (weights, run config, step; a directory's optimizer states are left out)."""
    out = Path(out)
    if out.resolve() == Path(path).resolve():
        raise CheckpointError(f"consolidate: the output {str(out)!r} is the checkpoint itself")
    ckpt = read_checkpoint(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    return out
