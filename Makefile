# The README's two commands. Both set themselves up on a fresh machine with Python 3 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/config.yaml
PYTEST_ARGS ?=

.PHONY: run test test-fast setup dryrun clean-results bench

setup: $(STAMP)

# Reinstall when the pinned requirements or the package metadata change.
$(STAMP): envs/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r envs/requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## run: the whole DAG on the embedded default (config/config.yaml) with the local profile
run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile local --configfile $(CONFIG)

## dryrun: list the DAG without running anything
dryrun: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile local --configfile $(CONFIG) -n

## test: the whole test suite, slow end-to-end tests included
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

## test-fast: skip the slow end-to-end tests
test-fast: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.step --phase sida --res 32 --channels 3 --batch 32 --model-channels 32 \
	  --channel-mult 1,2,2 --attn-res 16 --iters 10 --warmup 2 --threads 2
