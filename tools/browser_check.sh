#!/usr/bin/env bash
# Runs the browser `fetch` example of docs/api.md in headless Chromium against a real camserve, from
# another origin (so CORS is exercised), and prints what the page shows. Needs Debian's chromium
# (`apt-get install chromium`); loopback only. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
api_port=${API_PORT:-18765}
page_port=${PAGE_PORT:-18766}
work=$(mktemp -d)
cleanup() { kill "${api_pid:-}" "${page_pid:-}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cp tools/browser/page.html "$work/" && cp examples/star.png "$work/star.png"
CAMSERVE_PORT=$api_port CAMSERVE_CORS_ORIGINS="http://127.0.0.1:$page_port" "$PY" -m app \
    > "$work/api.log" 2>&1 &
api_pid=$!
"$PY" -m http.server "$page_port" --bind 127.0.0.1 --directory "$work" > /dev/null 2>&1 &
page_pid=$!
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$api_port/ready" > /dev/null && break
    sleep 1
done
url="http://127.0.0.1:$page_port/page.html?api=http://127.0.0.1:$api_port"
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --user-data-dir="$work/profile" --virtual-time-budget=20000)
chromium "${flags[@]}" --dump-dom "$url" 2>/dev/null | grep -E 'id="(status|result)"'
chromium "${flags[@]}" --window-size=400,400 --screenshot="${SCREENSHOT:-/tmp/camserve-browser.png}" \
    "$url" > /dev/null 2>&1
echo "screenshot: ${SCREENSHOT:-/tmp/camserve-browser.png}"
