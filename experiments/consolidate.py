"""One checkpoint file from an FSDP2 checkpoint directory.

    python -m experiments.consolidate runs/x/checkpoints/last.ckpt runs/x/last_full.ckpt

Under `trainer/fsdp2_h100.yaml`, `fit` writes `last.ckpt` as a directory of DCP shards
(see `casa.checkpoint`). Every casa reader takes that directory as it is (`init_from`,
`experiments.evaluate`, `experiments.stream`, `casa.assistant.load`); this command is for
tools outside casa that want one `torch.load`-able file. The file holds the full weights,
the run config and the step, without the optimizer states, so it can start a new stage or
be evaluated, but an exact resume (`--ckpt_path`) needs the directory.
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
    a = p.parse_args(argv)
    try:
        out = consolidate(a.checkpoint, a.out)
    except CheckpointError as e:
        if os.environ.get("CASA_TRACEBACK"):
            raise
        print(f"experiments.consolidate: error: {e}\n(set CASA_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
