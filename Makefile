# Pollinate: every command a developer or CI runs. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv/bin
PYTEST_ARGS ?=
# Every process of the tests and the demo (pytest, servers, sites, pods) imports torch,
# transformers and flwr. Where the environment turns bytecode writes off (this sandbox and CI
# set PYTHONDONTWRITEBYTECODE=1) and the venv holds no .pyc (uv installs without), each process
# compiled them from source again: 20 CPU-s against 7.4 for `import torch, transformers, flwr,
# peft, kubernetes, kopf`. Written by the first process that imports a module, read by the rest.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help env testbed up down status test test-unit lint demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

env:  ## the Python environment (.venv, cached under ~/.cache/pollinate)
	@bash tools/env.sh

testbed:  ## build the Go control-plane binaries (cached under ~/.cache/pollinate/testbed)
	@bash tools/testbed/build.sh

up: env testbed  ## start the local cluster (etcd, apiserver, controllers, scheduler, kwok) and S3
	@$(VENV)/pollinate-testbed up

down:  ## stop the local cluster and S3, and remove their state
	@$(VENV)/pollinate-testbed down

status:  ## is the local cluster running?
	@$(VENV)/pollinate-testbed status

lint: env  ## ruff
	@$(VENV)/ruff check .

test-unit: env  ## unit tests only, in under 3 minutes: no cluster, no servers, nothing marked slow
	@$(VENV)/python -m pytest tests/unit -m "not slow" $(PYTEST_ARGS)

test: env lint  ## everything: unit (slow ones too), integration (real control plane, S3, Flower) and e2e
	@bash tools/test.sh $(PYTEST_ARGS)

demo: env testbed  ## the end-to-end federated fine-tune on embedded defaults (writes reports/demo-*)
	@$(VENV)/python tools/demo/run.py $(DEMO_ARGS)

bench: env  ## the benchmarks in bench/ (BENCH_ARGS=--quick for a few minutes); writes bench/results/
	@$(VENV)/python bench/run.py $(BENCH_ARGS)

clean:  ## remove build and test leftovers from the clone
	rm -rf .pytest_cache .ruff_cache reports
