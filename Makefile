# Two commands on a fresh machine (Python 3.11, make):  make quickstart   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup quickstart test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/tvr quickstart

test: setup
	$(VENV)/bin/ruff check tvr platform tests benchmarks jobs
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf tvr-work .pytest_cache
