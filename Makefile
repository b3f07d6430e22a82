# One-command entry points for a fresh machine. Each target creates .venv if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all clean

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
# worker: two workers on two cores with two threads each wait on each other.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow" tests

# Everything, including slow multi-process tests.
test-all: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "slow or not slow" tests

clean:
	rm -rf $(VENV) runs
