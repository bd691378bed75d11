# The two commands of the README. Both set the machine up first (idempotent: a second run skips what is there).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: quickstart test install bench clean

quickstart: install
	$(PY) -m deit3_fast quickstart

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

install:
	@bash scripts/bootstrap.sh

bench: install
	$(PY) benchmarks/convert.py

clean:
	rm -rf runs/quickstart .pytest_cache
