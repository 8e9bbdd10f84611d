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

.PHONY: setup demo demo-rollback test lint imports bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m slipway.cli.demo

# After `make demo`: a candidate that breaks mid-canary is rolled back automatically.
demo-rollback: setup
	$(BIN)/python -m slipway.cli.demo --sabotage --skip-promote

test: setup imports
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# The dependency contracts of pyproject.toml ([tool.importlinter]). import-linter reads one package from one
# folder, so the pillars (mapped into slipway.* by package-dir) are copied into one tree under build/ first.
imports: setup
	rm -rf build/imports && mkdir -p build/imports
	cp -r slipway build/imports/slipway
	for p in registry flows serve policies governance; do cp -r $$p build/imports/slipway/$$p; done
	find build/imports -name __pycache__ -prune -exec rm -rf {} +
	cd build/imports && ../../$(BIN)/lint-imports ../../pyproject.toml

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
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/usage_durability.py
	$(BIN)/python bench/outage.py

clean:
	rm -rf $(VENV) .slipway .pytest_cache
