"""One checkpoint file from an FSDP2 checkpoint directory.

    python -m experiments.consolidate runs/x/checkpoints/last.ckpt runs/x/last_full.ckpt

Under `trainer/fsdp2_h100.yaml`, `fit` writes `last.ckpt` as a directory of DCP shards
(see `casa.checkpoint`). Every casa reader takes that directory as it is (`init_from`,
`experiments.evaluate`, `experiments.stream`, `casa.assistant.load`); this command is for
tools outside casa that want one `torch.load`-able file. The file holds the full weights,
the run config and the step, without the optimizer states, so it can start a new stage or
be evaluated, but an exact resume (`--ckpt_path`) needs the directory.

Every casa reader loads with `torch.load(weights_only=True)`: a checkpoint whose pickle holds
other Python objects (written before, or by hand) is refused. If you trust it, convert it once:

    python -m experiments.consolidate --trust-pickle old.ckpt new.ckpt

(the old file is unpickled in full, its objects turned into plain data; the new one loads safely).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from casa.checkpoint import CheckpointError, consolidate

    p = argparse.ArgumentParser(prog="python -m experiments.consolidate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory (or file) written by experiments.fit")
    p.add_argument("out", help="the checkpoint file to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle CHECKPOINT in full (runs any code in it: only for a file you trust) and write its "
                        "contents as plain data that loads with weights_only=True")
    a = p.parse_args(argv)
    try:
        out = consolidate(a.checkpoint, a.out, trust_pickle=a.trust_pickle)
    except (CheckpointError, OSError) as e:  # OSError: the output cannot be written (disk full)
        if os.environ.get("CASA_TRACEBACK"):
            raise
        print(f"experiments.consolidate: error: {e}\n(set CASA_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
