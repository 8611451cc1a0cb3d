#!/usr/bin/env bash
# CI as it runs on a submission: .ci/run in a fresh clone of a revision (default HEAD), in a
# temporary folder that is removed afterwards, pass or fail (each clone builds its own 6.6 GB
# venv: clones left behind fill the disk, and the next install stops with "No space left").
#   tools/fresh_ci.sh [REV]          # prints the run's output; exits with .ci/run's status
set -euo pipefail
rev="${1:-HEAD}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/camserve-ci.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
git -C "$work/clone" checkout -q "$(git -C "$repo" rev-parse "$rev")"
echo "fresh_ci: $(git -C "$work/clone" log --oneline -1) in $work/clone"
cd "$work/clone"
start=$(date +%s)
status=0
CI=true bash .ci/run || status=$?
echo "fresh_ci: .ci/run exited $status after $(( $(date +%s) - start )) s"
exit "$status"
