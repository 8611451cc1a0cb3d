"""Model listing and details."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.cam import METHODS
from app.http.deps import get_registry, require_api_key
from app.http.routes import error_responses
from app.http.schemas import MethodOptionInfo, ModelDetail, ModelList, ModelSummary, Preprocess
from app.models.registry import ModelEntry, ModelRegistry

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


def _summary(entry: ModelEntry) -> ModelSummary:
    spec = entry.spec
    return ModelSummary(
        name=entry.name,
        status=entry.status,
        description=spec.description if spec else "",
        error=entry.error,
        architecture=spec.architecture if spec else None,
        num_classes=spec.num_classes if spec else None,
        input_shape=list(spec.input_shape) if spec else None,
    )


@router.get("/models", response_model=ModelList, responses=error_responses(401))
def list_models(registry: ModelRegistry = Depends(get_registry)) -> ModelList:
    """List every model of the store with its status (and the reason when it failed)."""
    return ModelList(
        default_model=registry.default_model,
        models=[_summary(entry) for entry in registry.entries.values()],
    )


@router.get("/models/{name}", response_model=ModelDetail, responses=error_responses(401, 404, 503))
def get_model(name: str, registry: ModelRegistry = Depends(get_registry)) -> ModelDetail:
    """Describe one loaded model: labels, input size, target layers and the methods that apply."""
    model = registry.get(name)
    spec = model.spec
    return ModelDetail(
        **_summary(registry.entry(name)).model_dump(),
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
    )
