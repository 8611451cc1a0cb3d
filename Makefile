# camserve — the two commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Two installs: serving needs the package and its dependencies only; `make test` and the other
# developer targets add the dev extras (pytest, ruff, mypy, playwright, ...). The dev install is
# a superset: a venv that has it serves without installing anything.
STAMP       := $(VENV)/.camserve-installed
SERVE_STAMP := $(VENV)/.camserve-serve-installed
# TORCH=cpu: PyTorch's CPU wheels (no CUDA libraries: 4.5 GB less on disk) from PyTorch's
# CPU index (CAMSERVE_TORCH_INDEX to use a mirror), falling back to the default index when it
# cannot be reached; on a new .venv (`make clean` first to swap a CUDA one). tools/install.py
# says what it installs, how big and how long, first; pip shows its progress.
TORCH   ?= default
INSTALL := $(PY) tools/install.py --torch $(TORCH)

.PHONY: install dev serve shell test lint typecheck lint-deploy docs browser-deps redis-deps format bench bench-quality bench-serving bench-soak docker-smoke fuzz grpc-stubs clean

$(PY):
	@echo "camserve: creating the virtual environment $(VENV) ($(PYTHON) -m venv)"
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(INSTALL) '.[dev,timm,clients]'
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml | $(PY)
	@if [ ! $(STAMP) -nt pyproject.toml ]; then \
		$(INSTALL) . ; fi
	touch $(SERVE_STAMP)

install: $(STAMP)

# The developer venv (dev extras included): the `camserve` command, the tests and the linters.
dev: $(STAMP)

# `python -m app` drains on Ctrl-C or SIGTERM and exits 0, so make reports no failure.
serve: $(SERVE_STAMP)
	$(PY) -m app

# A shell with the venv's commands (camserve, python) on PATH, as `. .venv/bin/activate` gives;
# `make shell CMD='camserve --help'` runs one command in it instead.
CMD ?=
shell: $(SERVE_STAMP)
	@VIRTUAL_ENV="$(abspath $(VENV))" PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(if $(CMD),sh -c '$(CMD)',$${SHELL:-/bin/sh})

lint: $(STAMP)
	$(VENV)/bin/ruff check app camserve tests bench tools
	$(VENV)/bin/ruff format --check app camserve tests bench tools
	$(VENV)/bin/lint-imports  # the layer contract: [tool.importlinter] in pyproject.toml

format: $(STAMP)
	$(VENV)/bin/ruff format app camserve tests bench tools
	$(VENV)/bin/ruff check --fix app camserve tests bench tools

# mypy --strict on app/ and camserve/ (settings in pyproject.toml: [tool.mypy]).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

lint-deploy: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" tools/lint_deploy.sh

# The documentation site (mkdocs.yml): strict, so a broken link or anchor fails; offline (no
# fonts, plugins or analytics fetched). Output in site/ (git-ignored).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

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

test: $(STAMP) lint typecheck lint-deploy docs browser-deps redis-deps
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

# schemathesis, every check and phase (stateful included), for 10 min against `python -m app`
# (tools/fuzz.py); `make test` runs the same for about a minute (tests/tools/test_fuzz.py).
FUZZ_S ?= 600
fuzz: $(STAMP)
	$(PY) tools/fuzz.py --max-time $(FUZZ_S)

# The OIP gRPC messages: protoc (grpcio-tools) compiles app/grpc/proto/grpc_predict_v2.proto
# into the descriptor set committed beside it; tests/grpc/test_stubs.py checks it is current.
grpc-stubs: $(STAMP)
	$(PY) tools/grpc_stubs.py

# Builds and runs the Docker image end to end (minutes, GBs); not part of `make test`.
docker-smoke:
	tools/docker_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site
