# eddy — the two commands that matter: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint tools kafka-start kafka-stop bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

## tools: system packages the full test suite uses (Debian's prometheus for promtool and scrape tests).
tools:
	@bash deploy/install-tools.sh

## demo: broker, daemon, a producer replaying BBC News, predictions over gRPC, metrics.
demo: install tools
	$(VENV)/bin/eddy demo

## test: every test, against a real Kafka broker the tests start themselves.
test: install tools
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not kafka and not chaos and not slow and not prometheus"

lint: install
	$(VENV)/bin/ruff check service learner memory tests bench
	$(VENV)/bin/mypy

kafka-start: install
	$(VENV)/bin/eddy kafka start

kafka-stop: install
	$(VENV)/bin/eddy kafka stop

bench: install
	$(PY) bench/run_all.py

bench-quick: install
	$(PY) bench/run_all.py --quick

clean:
	-$(VENV)/bin/eddy kafka stop
	rm -rf .eddy .pytest_cache .mypy_cache .ruff_cache
