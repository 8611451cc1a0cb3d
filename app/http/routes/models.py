"""Model listing and details, and the native repository API (load, unload)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from app.cam import METHODS
from app.http.admin import get_control, require_admin_key
from app.http.deps import get_registry, require_api_key
from app.http.routes import error_responses
from app.http.schemas import (
    MethodInfo,
    MethodOptionInfo,
    ModelDetail,
    ModelList,
    ModelSummary,
    Preprocess,
    VersionSummary,
)
from app.models.control import ModelControl
from app.models.registry import ModelEntry, ModelRegistry
from app.pipeline.describe import SLOW_FORWARDS, describe
from app.protocols.repository import loaded_or_refused

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])
admin_router = APIRouter(tags=["model repository"], dependencies=[Depends(require_admin_key)])


def summarize(entry: ModelEntry) -> ModelSummary:
    """What ``/models`` says about one folder of the store."""
    spec = entry.spec
    serving = entry.serving
    return ModelSummary(
        name=entry.name,
        status=entry.status,
        description=spec.description if spec else "",
        error=entry.error,
        reload_error=entry.reload_error,
        version=serving.number if serving else None,
        versions=[
            VersionSummary(
                version=v.number, status=v.status, error=v.error, reload_error=v.reload_error
            )
            for v in sorted(entry.versions.values(), key=lambda v: v.number)
        ],
        architecture=spec.architecture if spec else None,
        num_classes=spec.num_classes if spec else None,
        input_shape=list(spec.input_shape) if spec else None,
        task=spec.task if spec else None,
        probabilities=spec.probabilities if spec and spec.task == "classification" else None,
    )


@router.get("/models", response_model=ModelList, responses=error_responses(401))
def list_models(registry: ModelRegistry = Depends(get_registry)) -> ModelList:
    """List every model of the store with its status (and the reason when it failed)."""
    return ModelList(
        default_model=registry.default_model,
        models=[summarize(entry) for entry in registry.entries.values()],
    )


@router.get("/models/{name}", response_model=ModelDetail, responses=error_responses(401, 404, 503))
def get_model(
    name: str,
    version: int | None = Query(None, ge=1, description="a version; default: the newest ready"),
    registry: ModelRegistry = Depends(get_registry),
) -> ModelDetail:
    """Describe one loaded model: labels, input size, target layers and the methods that apply."""
    model = registry.get(name, version)
    spec = model.spec
    return ModelDetail(
        **summarize(registry.entry(name)).model_dump(exclude={"version"}),
        version=spec.version,
        device=str(model.device),
        weights=spec.weights,
        labels=list(model.labels),
        preprocess=Preprocess(
            resize=spec.resize, crop=list(spec.crop), mean=list(spec.mean), std=list(spec.std)
        ),
        target_layers=list(model.target_layers),
        candidate_layers=list(model.candidate_layers),
        default_method=spec.default_method,
        methods=model.applicable_methods,
        not_applicable={k: v for k, v in model.methods.items() if v is not None},
        method_options={
            method: [
                MethodOptionInfo(**option.describe())
                for option in METHODS[method].options
                if option.public
            ]
            for method in model.applicable_methods
        },
        method_info={
            method: MethodInfo(**describe(model, METHODS[method])._asdict())
            for method in model.applicable_methods
        },
        slow_forwards=SLOW_FORWARDS,
        layer_shapes={
            layer: list(model.layer_shapes.get(layer, ())[1:]) for layer in model.candidate_layers
        },
    )


@admin_router.post(
    "/models/{name}/load",
    response_model=ModelSummary,
    responses=error_responses(401, 403, 404, 409, 422),
)
async def load_model(name: str, control: ModelControl = Depends(get_control)) -> ModelSummary:
    """Load the model's folder, or reload it beside the serving one and swap (explicit mode)."""
    return summarize(loaded_or_refused(await control.load(name)))


@admin_router.post(
    "/models/{name}/unload",
    response_model=ModelSummary | None,
    responses=error_responses(401, 403, 404, 409),
)
async def unload_model(
    name: str,
    control: ModelControl = Depends(get_control),
    registry: ModelRegistry = Depends(get_registry),
) -> ModelSummary | None:
    """Stop serving the model; running requests finish on it (explicit mode)."""
    await control.unload(name)
    entry = registry.entries.get(name)
    return summarize(entry) if entry is not None else None
