# One-command entry points for a fresh machine. Each target creates .venv if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all test-gpu clean

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# The main job: synthetic data (generated if missing) -> tiny CASA+ model -> metrics table.
demo: setup
	$(BIN)/python -m experiments.fit --config experiments/configs/demo.yaml

# The default test suite (CPU, offline, under 15 minutes on 2 cores). One torch thread per
# worker: two workers on two cores with two threads each wait on each other. GPU tests
# have their own target.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow and not gpu" tests

# Everything, including slow multi-process tests (and the GPU tests, skipped without CUDA).
test-all: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "slow or not slow" tests

# The GPU lane (README, "GPU lane"): real flash-attn and compiled flex, a bf16 FSDP2 step,
# host syncs per step, CASA⊕ layer memory, on one GPU; a one-line skip without CUDA.
test-gpu: setup
	$(BIN)/python tests/gpu/run.py

clean:
	rm -rf $(VENV) runs
