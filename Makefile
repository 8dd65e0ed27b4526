# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,chat,ray]'
	touch $(STAMP)

# The bot with the profile from config.toml ("tiny" as shipped: offline, no GPU): the web
# playground on http://127.0.0.1:8080 and the JSON API.
run: $(STAMP)
	$(PY) -m bot run

# Debian's Chromium for the browser tests (Playwright's own browser download cannot work
# offline). Needs root or sudo; without it the browser tests skip and say so.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	-if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium

# axe-core, which the page test runs in every state of the page (from npm, pinned; without
# network the install fails quietly and that one test skips and says so).
AXE := .cache/axe-core/node_modules/axe-core/axe.min.js
$(AXE):
	-npm install --prefix .cache/axe-core --no-audit --no-fund --no-package-lock axe-core@4.14.1

# The whole suite, offline: unit, engine, tasks with tiny models, real OCR, CLI, store,
# service, web API and page in a real headless Chromium, lint, types.
test: $(STAMP) $(CHROMIUM) $(AXE)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_PROXY=127.0.0.1,localhost \
		$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m bot bench caption --json
	$(PY) -m bot bench overhead --json

clean:
	rm -rf $(VENV) .cache build *.egg-info
