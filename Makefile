# Two user-facing targets: `make demo` and `make test` (`make test-fast`: the unmarked tier, for local work).
# They set up .venv on first use and reinstall only when pyproject.toml changes (the stamp file below records
# the last install).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS := train,replay,dataset,ros,cluster,bench,dev
# pyproject's [train] asks for a torch range; this exact version's CPU build lies on the dev image and CI, where
# pip takes it from disk (with no torch installed, a range would download a CUDA build of several GB).
TORCH  := torch==2.13.0

.PHONY: demo test test-fast lint bench clean-venv help

help:
	@echo "make demo   - set up .venv (first run only) and run the end-to-end pipeline on the cart-pole family"
	@echo "make test   - set up .venv (first run only), lint with ruff, run every test tier"
	@echo "make test-fast - lint, then the unmarked test tier only (not slow, not integration; ~1.5 min): for local work"
	@echo "make bench  - run the benchmarks in bench/ (JSON into runs/bench/); bench/adversarial_tasks.py (~1.5 h) runs on its own, see docs/BENCHMARKS.md"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "the development setup (training, tests) needs Python >= 3.11; set PYTHON=python3.11 (the robot side alone installs on 3.10: pip install metarl-robot)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/metarl demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow and not integration"

bench: $(STAMP)
	@mkdir -p runs/bench
	$(BIN)/python bench/env_steps.py > runs/bench/env_steps.json
	$(BIN)/python bench/planner_latency.py --bundle policies/cartpole_mb > runs/bench/planner_latency.json
	$(BIN)/python bench/node_latency.py > runs/bench/node_latency.json
	$(BIN)/python bench/context_policy_latency.py > runs/bench/context_policy_latency.json
	$(BIN)/python bench/meta_policy_latency.py --bundle policies/cartpole_mbmpo > runs/bench/meta_policy_latency.json
	@echo "wrote runs/bench/env_steps.json, planner_latency.json, node_latency.json, context_policy_latency.json" \
		"and meta_policy_latency.json (see docs/BENCHMARKS.md)"

clean-venv:
	rm -rf $(VENV)
