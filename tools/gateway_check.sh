#!/usr/bin/env bash
# Runs the gateway topology here: nginx (from apt, installed if missing; needs root for that)
# with deploy/gateway/nginx.conf in front of 3 `python -m app` replicas on local ports, 200
# mixed requests through it (HTTP and gRPC), one replica killed midway. See
# tools/gateway_check.py.
# Loopback only; about a minute. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
    echo "installing nginx from apt" >&2
    apt-get install -y -q nginx >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q nginx >/dev/null; }
fi
exec "$PY" tools/gateway_check.py "$@"
