# One-command entry points for a fresh machine. Each target creates .venv if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all test-gpu test-eval clean

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
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow and not gpu and not eval" tests

# Everything, including slow multi-process tests (and the GPU tests, skipped without CUDA).
test-all: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "slow or not slow" tests

# The GPU lane (README, "GPU lane"): real flash-attn and compiled flex, a bf16 FSDP2 step,
# host syncs per step, CASA⊕ layer memory, on one GPU; a one-line skip without CUDA.
test-gpu: setup
	$(BIN)/python tests/gpu/run.py

# The lmms-eval lane (README, "Evaluate with lmms-eval"): its own venv, because lmms-eval is
# installed without its pinned dependencies (they pull a CUDA torch); the `eval` extra is the
# set it imports to evaluate. Runs lmms-eval's evaluator on the casa model (tests/test_lmms_eval.py).
EVAL_VENV := .venv-eval
$(EVAL_VENV)/bin/.installed: pyproject.toml
	test -d $(EVAL_VENV) || $(PY) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/pip install -q torch==2.13.0
	$(EVAL_VENV)/bin/pip install -q -e ".[dev,eval]"
	$(EVAL_VENV)/bin/pip install -q --no-deps lmms-eval==0.7.3
	touch $@

test-eval: $(EVAL_VENV)/bin/.installed
	OMP_NUM_THREADS=1 $(EVAL_VENV)/bin/python -m pytest -q -m eval tests/test_lmms_eval.py

clean:
	rm -rf $(VENV) $(EVAL_VENV) runs
