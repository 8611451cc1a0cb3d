#!/usr/bin/env bash
# Runs the jobs-in-Redis topology here: redis-server and nginx (from apt, installed if missing;
# needs root for that), 3 `python -m app` replicas sharing Redis, 30 Score-CAM jobs through the
# gateway, one replica SIGKILLed mid-run. See tools/jobs_redis_check.py. Loopback only; about a
# minute or two. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for package in nginx redis-server; do
    binary=/usr/sbin/$package
    [[ $package == redis-server ]] && binary=/usr/bin/redis-server
    if ! command -v "$package" >/dev/null 2>&1 && [[ ! -x $binary ]]; then
        echo "installing $package from apt" >&2
        apt-get install -y -q "$package" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "$package" >/dev/null; }
    fi
done
exec "$PY" tools/jobs_redis_check.py "$@"
