# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# Real data for the MovieLens tests and recipes: ../shared/data when it exists.
METAREC_DATA ?= $(abspath ../shared/data)
export METAREC_DATA
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: setup quickstart test lint results clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/metarec fit --config recipes/quickstart.yaml

test: setup
	$(PY) -m pytest -q -x --durations=15

lint: setup
	$(VENV)/bin/ruff check framework plugins tests benchmarks

results: setup
	$(PY) benchmarks/ml100k_results.py --json benchmarks/results/ml100k_results.json

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
