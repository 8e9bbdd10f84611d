# The two commands of the README: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build these machines carry; a range would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup demo demo-rollback test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m slipway.demo

# After `make demo`: a candidate that breaks mid-canary is rolled back automatically.
demo-rollback: setup
	$(BIN)/python -m slipway.demo --sabotage --skip-promote

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/canary.py

clean:
	rm -rf $(VENV) .slipway .pytest_cache
