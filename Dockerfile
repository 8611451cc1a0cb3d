# camserve: REST inference-and-explanation service for PyTorch image classifiers.
#
#   docker build -t camserve:cpu .                                  # CPU wheels (default)
#   docker build -t camserve:cuda --build-arg TORCH_VARIANT=cuda .  # CUDA wheels from PyPI
#   docker build -t camserve .  # with ./wheels/*.whl present: offline, no index is contacted
#
# Build arguments:
#   PYTHON_IMAGE     base image (default python:3.11-slim)
#   TORCH_VARIANT    cpu | cuda; picks where torch/torchvision come from when no wheel folder
#   TORCH_CPU_INDEX  the PyTorch CPU wheel index used by TORCH_VARIANT=cpu
#
# Offline builds: put every wheel the service needs into ./wheels (for example with
# `pip download -d wheels torch torchvision fastapi ...` on a machine with access) and build as
# usual; the builder stage then installs with `--no-index --find-links /wheels`.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------------------------
# builder: a virtual environment with the runtime dependencies only (no compilers needed: every
# dependency ships manylinux wheels).
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
# `wheel[s]` is a glob so that the COPY still succeeds when ./wheels does not exist; when it
# does, its *.whl files land next to pyproject.toml in /build/wheels.
COPY pyproject.toml wheel[s] /build/wheels/

# The requirement list is read from pyproject.toml so that it is written down only once.
RUN python -c "import tomllib; deps = tomllib.load(open('wheels/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > requirements.txt \
 && if ls wheels/*.whl >/dev/null 2>&1; then \
        echo "installing from the local wheel folder (offline)"; \
        pip install --no-index --find-links /build/wheels -r requirements.txt; \
    elif [ "$TORCH_VARIANT" = "cpu" ]; then \
        echo "installing CPU torch from $TORCH_CPU_INDEX"; \
        pip install --extra-index-url "$TORCH_CPU_INDEX" -r requirements.txt; \
    elif [ "$TORCH_VARIANT" = "cuda" ]; then \
        echo "installing CUDA torch from PyPI"; \
        pip install -r requirements.txt; \
    else \
        echo "TORCH_VARIANT must be 'cpu' or 'cuda', got '$TORCH_VARIANT'" >&2; exit 1; \
    fi \
 && python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
 && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# --------------------------------------------------------------------------------------------
# runtime: the virtual environment, the code and the default model store; runs as a non-root user.
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="camserve" \
      org.opencontainers.image.description="PyTorch image classifiers with class activation maps over REST"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    CAMSERVE_HOST=0.0.0.0 \
    CAMSERVE_PORT=8000 \
    CAMSERVE_MODEL_STORE=/app/model_store

RUN groupadd --gid 10001 camserve \
 && useradd --no-log-init --no-create-home --uid 10001 --gid 10001 --home-dir /app \
        --shell /usr/sbin/nologin camserve

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY app/ /app/app/
# Baked-in default store; mount a volume on /app/model_store to serve other models.
COPY model_store/ /app/model_store/

USER 10001:10001
# HTTP, and the Open Inference Protocol over gRPC (CAMSERVE_GRPC_PORT).
EXPOSE 8000 8001

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CAMSERVE_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "app"]
