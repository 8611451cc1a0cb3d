# camserve — the two commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.camserve-installed

.PHONY: install serve test lint typecheck lint-deploy browser-deps redis-deps format bench bench-quality bench-serving bench-soak docker-smoke clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m app

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests bench tools
	$(VENV)/bin/ruff format --check app tests bench tools

format: $(STAMP)
	$(VENV)/bin/ruff format app tests bench tools
	$(VENV)/bin/ruff check --fix app tests bench tools

# mypy on app/ (settings in pyproject.toml: [tool.mypy]).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

lint-deploy: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" tools/lint_deploy.sh

# The browser tests (tests/browser) drive Debian's chromium through Playwright; they fail, never
# skip, without it. Installs it when missing (needs root and Debian's package index).
CHROMIUM ?= /usr/bin/chromium
browser-deps:
	@test -x $(CHROMIUM) || { apt-get update -qq && apt-get install -y -qq chromium; }

# The job-store tests run a real redis-server (Debian's package) on a free loopback port; they
# fail, never skip, without it. Installs it when missing (needs root and Debian's package index).
REDIS_SERVER ?= /usr/bin/redis-server
redis-deps:
	@test -x $(REDIS_SERVER) || { apt-get update -qq && apt-get install -y -qq redis-server; }

test: $(STAMP) lint typecheck lint-deploy browser-deps redis-deps
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/cam_latency.py

bench-quality: $(STAMP)
	$(PY) bench/cam_quality.py

# Starts the service twice (batching on/off) and loads it over loopback; about 70 s on 2 cores.
bench-serving: $(STAMP)
	$(PY) bench/service_load.py

# 10 min of mixed load at concurrency 16, an overload burst, abandoned requests, idle; about 14 min.
bench-soak: $(STAMP)
	$(PY) bench/soak.py

# Builds and runs the Docker image end to end (minutes, GBs); not part of `make test`.
docker-smoke:
	tools/docker_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
