#!/usr/bin/env bash
# The GPU checks of one device session: CUDA tests of the engine and the service, then the
# serving benchmark (SKIP_SERVING=1: not), the mixed scenario and the pause cost on CUDA. Run on
# a machine with a GPU and torch installed; missing pure-Python packages may come as wheels in
# .whl/ (see README, "GPU checks"). Results go to $OUT (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/camserve-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/cam/test_cuda.py tests/http/routes/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt" | tail -25
if [ -z "${SKIP_SERVING:-}" ]; then
    timeout "${BENCH_TIMEOUT:-300}" python3 bench/service_load.py --device cuda --models resnet50 \
        --concurrency "${LEVELS:-1,8,32}" --seconds "${SECONDS_PER_LEVEL:-15}" --repeats 5 \
        --out "$OUT/service_load_cuda.json" 2>&1 | tee "$OUT/service_load_cuda.txt" | tail -40
fi
# Short work beside a long job on the same model (#16's mixed scenario), on CUDA: whole jobs
# (a chunk takes milliseconds there), 3 rounds.
timeout "${MIXED_TIMEOUT:-240}" python3 bench/service_load.py --scenario mixed --device cuda \
    --models resnet50 --requests 30 --repeats 3 --out "$OUT/service_load_mixed_cuda.json" 2>&1 \
    | tee "$OUT/service_load_mixed_cuda.txt" | tail -40
# What the pause points cost a long pass when nobody waits.
timeout "${PAUSE_TIMEOUT:-150}" python3 bench/pause_cost.py --device cuda --rounds 20 \
    --channels 2048 --out "$OUT/pause_cost_cuda.json" 2>&1 | tee "$OUT/pause_cost_cuda.txt" | tail -12
