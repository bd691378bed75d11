# The two commands of the README. Both set the machine up first (idempotent: a second run skips what is there).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: quickstart test test-fast lint install bench clean

quickstart: install
	$(PY) -m deit3_fast quickstart

# One pytest process per core, at most 8 (each holds torch and its own copy of the module fixtures); a test file
# stays on one worker (--dist loadfile), so its module fixtures are built once. TEST_JOBS=0 runs in this process.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 8 ? n : 8 )))

test: install
	$(PY) -m pytest $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile) $(PYTEST_ARGS)

# The inner loop: no `slow` tests and no `cli` ones (those that start another process). CI runs `make test`.
test-fast: install
	$(PY) -m pytest -m "not slow and not cli" $(PYTEST_ARGS)

# What CI runs before the tests (.ci/run), and the pre-commit hooks run on each commit. Each step names its fix.
lint: install
	@$(VENV)/bin/ruff check . || { echo "lint: ruff check failed (above); many fix themselves: $(VENV)/bin/ruff check --fix ." >&2; exit 1; }
	@$(VENV)/bin/ruff format --check . || { echo "lint: files not formatted as ruff formats them (above); run: $(VENV)/bin/ruff format ." >&2; exit 1; }
	@$(VENV)/bin/mypy || { echo "lint: mypy found type errors (above); settings in pyproject.toml [tool.mypy]" >&2; exit 1; }
	@echo "lint: ruff check, ruff format --check and mypy passed"

install:
	@bash scripts/bootstrap.sh

bench: install
	$(PY) benchmarks/convert.py

clean:
	rm -rf runs/quickstart .pytest_cache
