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

# learn2learn interop runs in its own venv (learn2learn 0.2.0 does not build on Python 3.11 from
# PyPI; ../shared/tools/learn2learn-venv.sh patches and builds it).
L2L_VENV ?= $(HOME)/.cache/metarec/l2l-venv
L2L_SCRIPT ?= ../shared/tools/learn2learn-venv.sh

.PHONY: setup quickstart test test-l2l lint results results-items docs-tables clean

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

test-l2l:
	@if [ ! -f $(L2L_SCRIPT) ]; then echo "test-l2l: $(L2L_SCRIPT) not found, skipped"; exit 0; fi; \
	bash $(L2L_SCRIPT) $(L2L_VENV) && \
	$(L2L_VENV)/bin/python -m pip install -q -e ".[dev]" "numpy<2" && \
	$(L2L_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_l2l.py \
	    tests/test_algorithm_matrix.py tests/test_recipes.py -k "l2l"

lint: setup
	$(VENV)/bin/ruff check framework plugins tests benchmarks

results: setup
	$(PY) benchmarks/ml100k_results.py --json benchmarks/results/ml100k_results.json

# Item cold start (warm-up stages) and MeLU's four scenarios on ml-100k (about 40 minutes on 2
# cores; resumable: a rerun skips the runs already in the JSON).
results-items: setup
	$(PY) benchmarks/item_cold_start.py --threads 1 --study benchmarks/studies/ml100k_items.yaml --json benchmarks/results/items.json
	$(PY) benchmarks/item_cold_start.py --threads 1 --study benchmarks/studies/ml100k_scenarios.yaml --json benchmarks/results/scenarios.json
	$(PY) benchmarks/docs_tables.py --write

# Re-render the generated tables of docs/*.md from benchmarks/results/ (after a benchmark ran);
# tests/test_docs_tables.py fails while a committed table differs.
docs-tables: setup
	$(PY) benchmarks/docs_tables.py --write

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
