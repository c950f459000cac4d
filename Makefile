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

# --- containers (docs/containers.md) -------------------------------------------------------------
# CONTAINER_BASE: auto (the public Debian + Python image, else a Debian base made here with
# debootstrap), local (always the latter) or an image name. SIDA_BUILD_HOST_PIP=1/0/auto passes
# the host's pip settings (proxy CA, indexes, wheel folders) to the build (podman).
CONTAINER_BASE ?= auto
CONTAINER_ARCHIVE ?= docker
.PHONY: container container-test container-base container-clean

## container: build the image (podman, or docker), tag it with the git commit, record its digest
## in build/sida-image.json and write build/sida-pipeline-<tag>.docker.tar for apptainer build
container: $(STAMP)
	$(BIN)/python -m containers.image --base $(CONTAINER_BASE) --archive $(CONTAINER_ARCHIVE)

## container-test: build if needed, run a short distillation in the image and on the host, and
## fail unless the networks are bit-identical and provenance.json records the image digest
container-test: $(STAMP)
	$(BIN)/python -m containers.check --base $(CONTAINER_BASE)

## container-base: the local Debian 12 base image (debootstrap; no registry needed)
container-base: $(STAMP)
	$(BIN)/python -m containers.base

## container-clean: remove the project's images (not the base), build cache and archive
container-clean: $(STAMP)
	$(BIN)/python -m containers.image --clean
