# Two user-facing targets: `make demo` and `make test`. Both set up .venv on first use and
# reinstall only when pyproject.toml changes (the stamp file below records the last install).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS := train,ros,bench,dev

.PHONY: demo test lint bench clean-venv help

help:
	@echo "make demo   - set up .venv (first run only) and run the end-to-end pipeline on the cart-pole family"
	@echo "make test   - set up .venv (first run only), lint with ruff, run every test tier"
	@echo "make bench  - run the benchmarks in bench/ (prints JSON)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "metarl-robot needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/metarl demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/env_steps.py

clean-venv:
	rm -rf $(VENV)
