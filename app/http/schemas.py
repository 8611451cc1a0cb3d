"""Request and response bodies, with the examples shown on /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.pipeline.describe import SLOW_FORWARDS
from app.pipeline.results import ErrorDetail, JobStatus, with_example


class ErrorResponse(BaseModel):
    """Every error the service returns has this shape."""

    model_config = with_example(
        {
            "error": {
                "code": "model_not_found",
                "message": "Unknown model 'shape'. Available models: shapes.",
                "details": {"available": ["shapes"]},
            }
        }
    )
    error: ErrorDetail


class HealthResponse(BaseModel):
    model_config = with_example(
        {
            "status": "ok",
            "version": "0.1.0",
            "device": "cpu",
            "versions": {"python": "3.11.7", "torch": "2.5.1", "torchvision": "0.20.1"},
            "models_loaded": True,
        }
    )
    status: Literal["ok"] = "ok"
    version: str
    device: str
    versions: dict[str, str]
    models_loaded: bool


ModelStatus = Literal["loading", "ready", "failed", "unloaded"]


class JobStoreState(BaseModel):
    backend: Literal["memory", "redis"]
    available: bool = Field(description="whether the store answers (always true in memory)")
    problem: str | None = Field(
        None,
        description="why the store is unavailable, naming the setting and the fix (a Redis that "
        "does not answer, or refuses this replica: a password, database or ACL); null while "
        "it is available",
    )


class ReadyResponse(BaseModel):
    model_config = with_example({"ready": True, "models": {"shapes": "ready"}})
    ready: bool
    draining: bool = Field(False, description="the service got SIGTERM and takes no new work")
    models: dict[str, ModelStatus]
    job_store: JobStoreState | None = Field(
        None,
        description="the job store's state; Redis being down fails /jobs (503) but not "
        "readiness, since /predict and /explain still work",
    )


class VersionSummary(BaseModel):
    version: int
    status: ModelStatus
    error: str | None = Field(None, description="why this version failed to load")
    reload_error: str | None = Field(
        None, description="why its last reload failed (the previous load goes on serving)"
    )


class ModelSummary(BaseModel):
    name: str
    status: ModelStatus
    description: str = ""
    error: str | None = Field(None, description="why the model failed to load")
    reload_error: str | None = Field(
        None,
        description="why the last reload failed while the previous load goes on serving",
    )
    version: int | None = Field(
        None, description="the version `model=name` gets: the newest ready one"
    )
    versions: list[VersionSummary] = Field(
        default_factory=list,
        description="the versions served by the folder's version_policy (one, numbered 1, for "
        "a folder without version folders)",
    )
    architecture: str | None = None
    num_classes: int | None = None
    input_shape: list[int] | None = None
    task: str | None = Field(
        None, description="classification, detection or segmentation (the manifest's task)"
    )
    probabilities: str | None = Field(
        None,
        description="a classifier's rule from logits to probabilities: softmax (one class per "
        "image) or sigmoid (multi-label: each class on its own)",
    )


class ModelList(BaseModel):
    model_config = with_example(
        {
            "default_model": "shapes",
            "models": [
                {
                    "name": "shapes",
                    "status": "ready",
                    "description": "ResNet for 8 synthetic shapes",
                    "error": None,
                    "architecture": "app.models.zoo.shapes_resnet:build",
                    "num_classes": 8,
                    "input_shape": [3, 128, 128],
                }
            ],
        }
    )
    default_model: str
    models: list[ModelSummary]


class Preprocess(BaseModel):
    resize: int
    crop: list[int]
    mean: list[float]
    std: list[float]


class MethodOptionInfo(BaseModel):
    """One option of a method, as the method declares it (``app.cam.options``)."""

    name: str
    type: Literal["integer", "number", "string", "boolean", "integer list"]
    default: bool | int | float | str | None = Field(description="the method's default")
    minimum: float | None = Field(description="lowest value accepted")
    maximum: float | None = Field(description="highest value accepted")
    help: str
    choices: list[str] | None = Field(None, description="the values a string option takes")


class MethodInfo(BaseModel):
    """What a method is and what it costs on this model (``app.pipeline.describe``)."""

    summary: str = Field(description="the first line of the method's docstring: name and paper")
    forwards: int = Field(
        description="forwards of its own per image (masked, ablated or noisy inputs) at the "
        "default target layers and options; 0 for methods that run none"
    )
    slow: bool = Field(description="forwards >= slow_forwards: worth running as a job")


class ModelDetail(ModelSummary):
    model_config = with_example(
        {
            "name": "shapes",
            "status": "ready",
            "description": "ResNet for 8 synthetic shapes",
            "architecture": "app.models.zoo.shapes_resnet:build",
            "num_classes": 8,
            "input_shape": [3, 128, 128],
            "device": "cpu",
            "weights": "weights.pt",
            "labels": ["circle", "square", "triangle"],
            "preprocess": {"resize": 128, "crop": [128, 128], "mean": [0.5] * 3, "std": [0.25] * 3},
            "target_layers": ["layer3"],
            "candidate_layers": ["conv1", "layer1", "layer2", "layer3"],
            "default_method": "GradCAM",
            "methods": ["CAM", "GradCAM", "GradCAMpp", "ScoreCAM"],
            "not_applicable": {},
            "method_options": {
                "ScoreCAM": [
                    {
                        "name": "batch_size",
                        "type": "integer",
                        "default": 32,
                        "minimum": 1,
                        "maximum": 256,
                        "help": "masked inputs per forward (memory, not the result)",
                    }
                ]
            },
            "method_info": {
                "GradCAM": {
                    "summary": "Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391).",
                    "forwards": 0,
                    "slow": False,
                },
                "ScoreCAM": {
                    "summary": "Score-CAM (Wang et al., CVPR-W 2020, arXiv:1910.01279), "
                    "Algorithm 1.",
                    "forwards": 64,
                    "slow": True,
                },
            },
            "slow_forwards": 1,
            "layer_shapes": {"layer3": [64, 8, 8]},
        }
    )
    device: str
    weights: str
    labels: list[str]
    preprocess: Preprocess
    target_layers: list[str] = Field(description="layers explained when none is asked for")
    candidate_layers: list[str] = Field(description="layers with spatial outputs worth trying")
    default_method: str
    methods: list[str] = Field(description="CAM methods that apply to this model")
    not_applicable: dict[str, str] = Field(description="method -> why it does not apply")
    method_options: dict[str, list[MethodOptionInfo]] = Field(
        default_factory=dict,
        description="method -> the options a request may set for it (form fields of /explain)",
    )
    method_info: dict[str, MethodInfo] = Field(
        default_factory=dict,
        description="method -> its summary and its cost here (the page marks slow ones and "
        "runs them as jobs)",
    )
    slow_forwards: int = Field(
        SLOW_FORWARDS,
        description="a method that runs this many forwards of its own per image is slow",
    )
    layer_shapes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="candidate layer -> the shape of its output for one image (channels, ...)",
    )


class JobCreated(BaseModel):
    model_config = with_example(
        {
            "id": "6tWq0mD1xK9vR3pZ8yL2cJ4a",
            "status": "queued",
            "url": "/jobs/6tWq0mD1xK9vR3pZ8yL2cJ4a",
        }
    )

    id: str = Field(description="unguessable job id")
    status: JobStatus
    url: str = Field(description="where to follow the job (also in the Location header)")
