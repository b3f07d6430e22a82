"""How `experiments.fit` writes and reads checkpoint files: atomically, finite, and without pickled code.

Lightning's `TorchCheckpointIO` writes through fsspec: a temporary file from `tempfile.mkstemp`
(in `$TMPDIR`), then `shutil.move`, which is a rename only when `$TMPDIR` is on the checkpoint's
filesystem. Elsewhere (tmpfs, node-local scratch) it is a copy, and a kill during the copy
leaves a truncated `last.ckpt` in place of the good one. `AtomicCheckpointIO` writes instead
through `casa.atomic.atomic_write` (temporary file beside the checkpoint, fsync, rename), and:

- refuses to write weights holding NaN/inf (`NonFiniteCheckpointError`): a diverged step never
  replaces a good checkpoint (and, since the write raised, ModelCheckpoint does not delete the
  older ones it would have replaced);
- turns a failed write (a full disk) into one `CheckpointWriteError` line naming the file; the
  previous checkpoint under that name is untouched;
- loads with `torch.load(weights_only=True)` (`casa.checkpoint.safe_load`).

`experiments.fit` adds it to every trainer's `plugins` unless a config names a CheckpointIO of
its own. Under FSDP2 with `save_distributed_checkpoint=True`, Lightning writes DCP directories
itself and does not call a CheckpointIO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from casa.atomic import atomic_write
from casa.checkpoint import CheckpointError, check_finite, safe_load


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is kept."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint was not written because its weights hold NaN/inf."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic, finite-only writes and weights_only reads (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint: storage_options={storage_options!r} is not "
                            "supported (local files only)")
        path = Path(path)
        try:
            check_finite(checkpoint.get("state_dict", {}), f"the checkpoint for {path} (step "
                                                           f"{checkpoint.get('global_step')})")
        except CheckpointError as e:
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written under that name"
            raise NonFiniteCheckpointError(f"{e}; not written, {kept}") from None
        existed = path.exists()
        try:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except OSError as e:
            kept = f"the previous {path.name} is kept" if existed else "nothing was written under that name"
            raise CheckpointWriteError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}; {kept}") from None

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load(Path(path), map_location=map_location)
