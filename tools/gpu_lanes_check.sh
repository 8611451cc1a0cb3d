#!/usr/bin/env bash
# The GPU checks of issue #25 in one device session (about 6 minutes, at most 8): the CUDA tests
# of the device lanes and of the engine, then bench/gpu_pipeline.py on CUDA with a soak at c=32
# (device memory after warm-up and at the end). Run on a machine with a GPU and torch; missing
# pure-Python packages (pytorch-grad-cam and its dependencies for the peer) may come as wheels
# in .whl/. Results go to $OUT (or /tmp/camserve-gpu-lanes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/camserve-gpu-lanes}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/pipeline/lanes tests/cam/test_cuda.py tests/cam/test_chunking.py \
    2>&1 | tee "$OUT/lanes_tests.txt" | tail -25
timeout "${BENCH_TIMEOUT:-330}" python3 bench/gpu_pipeline.py --device cuda \
    --seconds "${SECONDS_PER_RUN:-15}" --repeats 15 --soak-seconds "${SOAK_SECONDS:-120}" \
    --out "$OUT/gpu_pipeline.json" 2>&1 | tee "$OUT/gpu_pipeline.txt" | tail -40
