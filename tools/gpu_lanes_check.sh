#!/usr/bin/env bash
# The GPU checks of issue #25, in device sessions of at most 10 minutes a command.
#
#   tools/gpu_lanes_check.sh          # about 6 minutes, at most 9.5: the CUDA tests of the device
#                                     # lanes, the engine, the compiled forward and the task
#                                     # passes, then
#                                     # bench/gpu_pipeline.py on CUDA, then a short
#                                     # bench/compile_forward.py (eager against compile and
#                                     # cudagraphs, resnet50)
#   tools/gpu_lanes_check.sh soak     # opt-in, a step of its own (about 6 minutes): a soak at
#                                     # c=32 for SOAK_SECONDS (300) watching device memory
#
# Run on a machine with a GPU and torch; missing pure-Python packages (pytorch-grad-cam and its
# dependencies for the peer) may come as wheels in .whl/ (python tools/gpu_wheels.py fills it;
# carry .whl). Results go to $OUT (or
# /tmp/camserve-gpu-lanes).
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
if [ "${1:-}" = "soak" ]; then
    timeout "${SOAK_TIMEOUT:-420}" python3 bench/gpu_pipeline.py --device cuda --soak-only \
        --soak-seconds "${SOAK_SECONDS:-300}" --out "$OUT/gpu_soak.json" \
        2>&1 | tee "$OUT/gpu_soak.txt" | tail -5
    exit 0
fi
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/pipeline/lanes tests/cam/test_cuda.py tests/cam/test_chunking.py \
    tests/models/test_compiling.py tests/pipeline/tasks/test_cuda.py \
    2>&1 | tee "$OUT/lanes_tests.txt" | tail -25
timeout "${BENCH_TIMEOUT:-300}" python3 bench/gpu_pipeline.py --device cuda \
    --seconds "${SECONDS_PER_RUN:-15}" --repeats 15 --soak-seconds "${SOAK_IN_RUN_SECONDS:-0}" \
    --out "$OUT/gpu_pipeline.json" 2>&1 | tee "$OUT/gpu_pipeline.txt" | tail -40
timeout "${COMPILE_TIMEOUT:-120}" python3 bench/compile_forward.py --device cuda \
    --modes compile,cudagraphs --batches 1,32 --rounds 20 --out "$OUT/compile_forward.json" \
    2>&1 | tee "$OUT/compile_forward.txt" | tail -12
