#!/usr/bin/env bash
# End-to-end smoke test of the camserve image and docker-compose.yml on a machine that has no
# running Docker engine and cannot reach an image registry (see docker-here.md in the team notes):
#
#   1. installs docker.io, docker-compose (v1) and debootstrap if they are missing (needs root);
#   2. starts a private dockerd (no bridge, no iptables, registry pulls fail at once);
#   3. builds the python:3.11-slim base image with debootstrap (rootfs tarball cached);
#   4. downloads the runtime wheels on the host with pip (cached), adds those that the image's
#      Python needs beyond the host's (tools/image_wheels.py), and builds the image offline
#      with them (`--network none`; the Dockerfile installs from ./wheels with --no-index);
#   5. runs the image with --network host on free ports, waits for its HEALTHCHECK, then calls
#      GET /health, GET /models and a real POST /explain and checks the answers, and asks the
#      gRPC server for its health;
#   6. validates the compose file with docker-compose, brings the service up through it (with a
#      host-network override generated here), checks /health, and takes it down;
#   7. always stops the containers and the private dockerd on exit.
#
# Usage: tools/docker_smoke.sh [--clean]
#   --clean   after the run, delete the private engine's data (images, build cache); the
#             rootfs tarball and the wheel folder are kept for the next run.
# Environment:
#   CAMSERVE_SMOKE_DIR   cache/work folder (default /var/tmp/camserve-docker-smoke, outside the
#                        repository so the engine's data never enters a build context)
#   CAMSERVE_SMOKE_IMAGE tag of the image built (default camserve:smoke)
#   CAMSERVE_SMOKE_PORT  host port to serve on (default: 8000 if free, else any free port)
#   CAMSERVE_SMOKE_GRPC_PORT       host port for gRPC (default: 8001 if free, else any free port)
#   CAMSERVE_SMOKE_MODEL_STORE     a model store folder to mount over the baked-in one (tests
#                                  the volume override; default: serve the baked-in store)
#   CAMSERVE_SMOKE_SKIP_COMPOSE=1  skip step 6
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE_DIR="${CAMSERVE_SMOKE_DIR:-/var/tmp/camserve-docker-smoke}"
IMAGE="${CAMSERVE_SMOKE_IMAGE:-camserve:smoke}"
BASE_IMAGE="python:3.11-slim"
CONTAINER="camserve-smoke"
PROJECT="camserve-smoke"
CLEAN=0
for arg in "$@"; do
    case "$arg" in
        --clean) CLEAN=1 ;;
        -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '\n==> %s\n' "$*"; }
die() { printf '\nSMOKE FAILED: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || die "needs root (installs packages and starts a private dockerd)"

HOST_PY="$ROOT/.venv/bin/python"
[[ -x "$HOST_PY" ]] || HOST_PY="$(command -v python3)"

# --- 1. tools ------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        docker.io docker-compose debootstrap
fi
# Prefer the engine's own client (20.10) over any newer stand-alone CLI earlier on PATH: the
# legacy builder is then used without deprecation noise, the same one docker-compose v1 uses.
DOCKER=docker
[[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

# --- 2. private engine -----------------------------------------------------------------------
mkdir -p "$SMOKE_DIR"
SMOKE_DIR="$(cd "$SMOKE_DIR" && pwd)"
CONTEXT="$SMOKE_DIR/context"
OVERRIDE="$SMOKE_DIR/compose.smoke.yml"
export DOCKER_HOST="unix://$SMOKE_DIR/docker.sock"

if [[ -s "$SMOKE_DIR/dockerd.pid" ]] && kill -0 "$(cat "$SMOKE_DIR/dockerd.pid")" 2>/dev/null; then
    die "a dockerd from another smoke run is still running (pid $(cat "$SMOKE_DIR/dockerd.pid"))"
fi

DOCKERD_PID=""
COMPOSE_UP=0
cleanup() {
    local rc=$?
    set +e
    if [[ -n "$DOCKERD_PID" ]]; then
        log "cleaning up"
        $DOCKER rm -f "$CONTAINER" >/dev/null 2>&1
        if ((COMPOSE_UP)); then
            docker-compose -p "$PROJECT" --project-directory "$ROOT" -f "$OVERRIDE" \
                down --remove-orphans >/dev/null 2>&1
        fi
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "dockerd did not stop in 30 s; killing it"
            kill -9 "$DOCKERD_PID" 2>/dev/null
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        echo "dockerd (pid $DOCKERD_PID) stopped"
        # dockerd leaves its netns/default bind mount behind; drop it (and anything else left).
        awk -v dir="$SMOKE_DIR/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r \
            | while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt"; done
    fi
    rm -rf "$CONTEXT"
    if ((CLEAN)); then
        echo "removing the engine data in $SMOKE_DIR/data"
        rm -rf "$SMOKE_DIR/data" "$SMOKE_DIR/exec"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting a private dockerd in $SMOKE_DIR"
HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY=127.0.0.1,localhost \
    dockerd --bridge=none --iptables=false \
    --data-root "$SMOKE_DIR/data" --exec-root "$SMOKE_DIR/exec" \
    --pidfile "$SMOKE_DIR/dockerd.pid" -H "$DOCKER_HOST" >"$SMOKE_DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do
    $DOCKER info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$SMOKE_DIR/dockerd.log"; die "dockerd exited"; }
    sleep 1
done
$DOCKER info >/dev/null 2>&1 || { tail -20 "$SMOKE_DIR/dockerd.log"; die "dockerd did not answer in 60 s"; }
$DOCKER version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
$DOCKER info --format 'storage driver {{.Driver}}'

# --- 3. base image ---------------------------------------------------------------------------
# The official image sets PATH (and the Dockerfile extends it); an imported rootfs has no ENV.
if ! $DOCKER image inspect -f '{{.Config.Env}}' "$BASE_IMAGE" 2>/dev/null | grep -q PATH=; then
    ROOTFS_TAR="$SMOKE_DIR/python-3.11-slim-rootfs.tar"
    if [[ ! -s "$ROOTFS_TAR" ]]; then
        log "debootstrapping a bookworm rootfs with python3 (about a minute)"
        rm -rf "$SMOKE_DIR/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$SMOKE_DIR/rootfs" http://deb.debian.org/debian >"$SMOKE_DIR/debootstrap.log"
        rm -f "$SMOKE_DIR"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
        ln -sf /usr/bin/python3 "$SMOKE_DIR/rootfs/usr/local/bin/python"
        ln -sf /usr/bin/pip3 "$SMOKE_DIR/rootfs/usr/local/bin/pip"
        rm -rf "$SMOKE_DIR"/rootfs/var/cache/apt/archives/*.deb "$SMOKE_DIR"/rootfs/var/lib/apt/lists/*
        tar -C "$SMOKE_DIR/rootfs" -cf "$ROOTFS_TAR.tmp" .
        mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
        rm -rf "$SMOKE_DIR/rootfs"
    fi
    log "importing $BASE_IMAGE from $ROOTFS_TAR"
    $DOCKER import --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
fi
$DOCKER run --rm --network none "$BASE_IMAGE" python --version

# --- 4. wheels and image ---------------------------------------------------------------------
WHEELS="$SMOKE_DIR/wheels"
REQS="$SMOKE_DIR/requirements.txt"
"$HOST_PY" -c "import sys, tomllib; print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" \
    "$ROOT/pyproject.toml" >"$REQS"
if ! cmp -s "$REQS" "$WHEELS/.requirements"; then
    log "downloading wheels for $(paste -sd' ' "$REQS")"
    # The host's pip configuration decides which torch build comes (here: the CUDA build of
    # torch 2.14.1 from local disk, several GB). PyPI's torchvision cannot be imported beside a
    # +cpu torch, so a CPU-only image needs the PyTorch CPU index, which this machine can't reach.
    mkdir -p "$WHEELS"
    "$HOST_PY" -m pip download -q --only-binary=:all: -d "$WHEELS" -r "$REQS"
    cp "$REQS" "$WHEELS/.requirements"
fi
# pip chose the wheels for the host's Python; the image's may need more (python_full_version
# markers: redis wants async-timeout below 3.11.3, bookworm has 3.11.2). tools/image_wheels.py
# names what is missing under the image's marker environment.
IMAGE_ENV="$SMOKE_DIR/image-environment.json"
$DOCKER run --rm --network none -v "$ROOT/tools/image_wheels.py:/image_wheels.py:ro" \
    "$BASE_IMAGE" python /image_wheels.py environment >"$IMAGE_ENV"
for round in 1 2 3 4 5 6; do
    more="$("$HOST_PY" "$ROOT/tools/image_wheels.py" missing "$WHEELS" "$REQS" "$IMAGE_ENV")"
    [[ -n "$more" ]] || break
    ((round < 6)) || die "wheels still missing for the image's Python: $(echo $more)"
    mapfile -t more_list <<<"$more"
    log "downloading what the image's Python needs beyond the host's: ${more_list[*]}"
    "$HOST_PY" -m pip download -q --only-binary=:all: -d "$WHEELS" "${more_list[@]}"
done
echo "wheels: $(find "$WHEELS" -name '*.whl' | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"

log "assembling the build context (working tree + wheels/)"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT"
# Tracked and untracked-but-not-ignored files: what a fresh clone plus local edits would hold.
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - 2>/dev/null \
    | tar -C "$CONTEXT" -xf -
# Git keeps no empty folders; the Dockerfile copies model_store/ even when it is still empty.
mkdir -p "$CONTEXT/model_store"
cp -al "$WHEELS" "$CONTEXT/wheels" 2>/dev/null || cp -a "$WHEELS" "$CONTEXT/wheels"

log "building $IMAGE offline (docker build --network none)"
build_start=$SECONDS
$DOCKER build --network none -t "$IMAGE" "$CONTEXT"
BUILD_S=$((SECONDS - build_start))
rm -rf "$CONTEXT"
IMAGE_SIZE="$($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"
echo "built $IMAGE in ${BUILD_S}s, size $IMAGE_SIZE"
$DOCKER image ls

# --- 5. docker run --network host ------------------------------------------------------------
free_port() { # the port wanted if it is free, else any free one; never the second argument
    "$HOST_PY" - "$@" <<'EOF'
import socket
import sys

def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]

wanted, taken = int(sys.argv[1]), int(sys.argv[2])
found = free(wanted) if wanted != taken else None
while found in (None, taken):
    found = free(0)
print(found)
EOF
}
# The container shares the host's network: gRPC (8001 in the image) needs a free port too, or
# the service exits at start ('cannot listen for gRPC').
PORT="${CAMSERVE_SMOKE_PORT:-$(free_port 8000 0)}"
GRPC_PORT="${CAMSERVE_SMOKE_GRPC_PORT:-$(free_port 8001 "$PORT")}"

grpc_health() { # container, port, label: the gRPC health service, asked inside the container
    $DOCKER exec "$1" python -c "
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel('127.0.0.1:' + sys.argv[1]) as channel:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
print(sys.argv[2], 'gRPC health on port', sys.argv[1] + ':', status)
sys.exit(answer.status != health_pb2.HealthCheckResponse.SERVING)
" "$2" "$3"
}

wait_healthy() { # container, timeout_s
    local status=""
    for _ in $(seq "$2"); do
        status="$($DOCKER inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1")"
        case "$status" in
            "running healthy") echo "$1: $status"; return 0 ;;
            exited* | dead*) break ;;
        esac
        sleep 1
    done
    echo "$1 is '$status'; its log:"
    $DOCKER logs --tail 50 "$1" 2>&1
    $DOCKER inspect -f '{{json .State.Health}}' "$1" 2>/dev/null || true
    return 1
}

STORE_MOUNT=()
if [[ -n "${CAMSERVE_SMOKE_MODEL_STORE:-}" ]]; then
    CAMSERVE_SMOKE_MODEL_STORE="$(cd "$CAMSERVE_SMOKE_MODEL_STORE" && pwd)"
    export CAMSERVE_MODEL_STORE_DIR="$CAMSERVE_SMOKE_MODEL_STORE" # read by docker-compose.yml
    STORE_MOUNT=(--volume "$CAMSERVE_SMOKE_MODEL_STORE:/app/model_store:ro")
    echo "mounting $CAMSERVE_SMOKE_MODEL_STORE over /app/model_store"
fi

log "running $IMAGE with --network host on port $PORT (gRPC $GRPC_PORT)"
run_start=$SECONDS
$DOCKER run -d --name "$CONTAINER" --network host --memory 4g \
    -e CAMSERVE_PORT="$PORT" -e CAMSERVE_GRPC_PORT="$GRPC_PORT" --health-interval 3s ${STORE_MOUNT[@]+"${STORE_MOUNT[@]}"} "$IMAGE" >/dev/null
wait_healthy "$CONTAINER" 300 || die "the container did not become healthy"
echo "healthy after $((SECONDS - run_start))s"
$DOCKER exec "$CONTAINER" id

log "calling the API on http://127.0.0.1:$PORT"
"$HOST_PY" "$ROOT/tools/smoke_api.py" "$PORT" "$ROOT/examples" \
    || { $DOCKER logs --tail 40 "$CONTAINER"; die "API checks failed"; }
grpc_health "$CONTAINER" "$GRPC_PORT" run || die "the gRPC server is not serving"
$DOCKER logs --tail 15 "$CONTAINER" 2>&1 | sed 's/^/  container| /'
$DOCKER rm -f "$CONTAINER" >/dev/null

# --- 6. docker-compose -----------------------------------------------------------------------
if [[ "${CAMSERVE_SMOKE_SKIP_COMPOSE:-0}" != 1 ]]; then
    log "docker-compose: config and up (host network, port $PORT, gRPC $GRPC_PORT)"
    # The repository's file publishes 8000:8000 like any ordinary setup, but here containers must
    # stay on the host network, and Compose v1 refuses `network_mode: host` beside published
    # ports (an override can only add ports, not remove them). So the file as Compose resolves
    # it is rewritten: the CPU service only, no ports, host network, the smoke port.
    CAMSERVE_IMAGE="$IMAGE" docker-compose -f "$ROOT/docker-compose.yml" config \
        | "$HOST_PY" -c '
import sys, yaml
config = yaml.safe_load(sys.stdin)
service = config["services"]["camserve"]
service.pop("ports", None)
service.pop("build", None)
service["network_mode"] = "host"
service["environment"]["CAMSERVE_PORT"] = sys.argv[1]
service["environment"]["CAMSERVE_GRPC_PORT"] = sys.argv[2]
service["healthcheck"]["interval"] = "3s"
config["services"] = {"camserve": service}
yaml.safe_dump(config, sys.stdout, sort_keys=False)
' "$PORT" "$GRPC_PORT" >"$OVERRIDE"
    compose() {
        docker-compose -p "$PROJECT" --project-directory "$ROOT" -f "$OVERRIDE" "$@"
    }
    docker-compose --version
    CAMSERVE_IMAGE="$IMAGE" docker-compose -f "$ROOT/docker-compose.yml" config -q
    CAMSERVE_IMAGE="$IMAGE" docker-compose -f "$ROOT/docker-compose.yml" --profile gpu config --services
    COMPOSE_UP=1
    compose up -d --no-build camserve
    cid="$(compose ps -q camserve)"
    wait_healthy "$cid" 300 || die "the compose service did not become healthy"
    for path in /health /models; do
        "$HOST_PY" -c "import sys, urllib.request as u; r = u.urlopen(sys.argv[1], timeout=10); print('compose GET', sys.argv[2] + ':', r.status, r.read().decode()[:300])" \
            "http://127.0.0.1:$PORT$path" "$path"
    done
    grpc_health "$cid" "$GRPC_PORT" compose || die "the compose service's gRPC is not serving"
    $DOCKER inspect -f 'mounts: {{range .Mounts}}{{.Source}} -> {{.Destination}} (rw={{.RW}}) {{end}}' "$cid"
    compose down
    COMPOSE_UP=0
    $DOCKER network ls --format '{{.Name}} ({{.Driver}})' | paste -sd' ' | sed 's/^/networks left: /'
fi

log "SMOKE PASSED: image $IMAGE ($IMAGE_SIZE, built in ${BUILD_S}s), port $PORT, gRPC $GRPC_PORT"
