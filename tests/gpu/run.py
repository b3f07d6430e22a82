"""`make test-gpu`: the GPU lane (tests/gpu/test_gpu.py) on one GPU, with its table.

    python tests/gpu/run.py [extra pytest arguments]

Without a CUDA device it prints one line and exits 0 (nothing to check here); otherwise it
runs the `gpu` tests (table from tests/gpu/conftest.py) and exits with pytest's status,
non-zero on any failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"GPU lane skipped: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)")
        return 0
    import pytest

    os.chdir(ROOT)  # `tests.gpu.checks` imports from the repository root
    sys.path.insert(0, str(ROOT))
    return int(pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
