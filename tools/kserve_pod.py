"""Print the pod that a KServe InferenceService's predictor describes, for kubernetes-validate.

kubernetes-validate has no schema for KServe's custom resources. The predictor of an
InferenceService is a Kubernetes PodSpec plus KServe's own fields (replicas, scaling, timeout):
this takes the PodSpec part out as a Pod, so the containers, probes, resources, security
context and volumes get the strict core-schema check, and fails on anything else unexpected.

    python tools/kserve_pod.py deploy/kserve/inferenceservice.yaml > pod.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

API_VERSION = "serving.kserve.io/v1beta1"
# KServe's ComponentExtensionSpec: the predictor's fields that are not PodSpec fields.
KSERVE_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "scaleMetricType",
    "autoScaling",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
    "workerSpec",
}


def predictor_pod(document: dict) -> dict:
    """The predictor's PodSpec as a Pod; ValueError when the document is not what we expect."""
    if document.get("apiVersion") != API_VERSION or document.get("kind") != "InferenceService":
        raise ValueError(f"expected an InferenceService of {API_VERSION}")
    predictor = document.get("spec", {}).get("predictor")
    if not isinstance(predictor, dict) or not predictor.get("containers"):
        raise ValueError("spec.predictor.containers is required for a custom predictor")
    spec = {key: value for key, value in predictor.items() if key not in KSERVE_FIELDS}
    name = document.get("metadata", {}).get("name", "predictor")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        pod = predictor_pod(yaml.safe_load(Path(argv[1]).read_text()))
    except (OSError, yaml.YAMLError, ValueError) as error:
        print(f"kserve_pod: {argv[1]}: {error}", file=sys.stderr)
        return 1
    yaml.safe_dump(pod, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
