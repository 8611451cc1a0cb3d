"""KServe v1 protocol: ``:predict`` and ``:explain`` with base64 images as instances."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.http.deps import get_explainer, get_registry, get_settings, require_api_key, within_limits
from app.http.protocols.base import (
    ERROR_RESPONSES,
    EXAMPLE_IMAGE_B64,
    ProtocolRoute,
    decode_images,
    get_model_ready,
)
from app.models.registry import ModelRegistry
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.params import PARAMETERS, build_params
from app.pipeline.results import ExplainResult, PredictResult
from app.settings import Settings

router = APIRouter(
    prefix="/v1/models",
    tags=["kserve v1 protocol"],
    route_class=ProtocolRoute,
    dependencies=[Depends(require_api_key)],
)


class B64(BaseModel):
    """Binary data as in TensorFlow Serving's REST API: ``{"b64": "..."}``."""

    model_config = ConfigDict(extra="forbid")
    b64: str


class PredictInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: B64
    top_k: int = Field(5, ge=1, le=1000, description="classes returned for this image")


#: The general parameters an instance takes (its own ``class_idx`` is one per image).
_INSTANCE_PARAMETERS = tuple(name for name in PARAMETERS if name != "class_idx")


def _document_parameters(schema: dict[str, Any]) -> None:
    """The instance's explain parameters in its JSON schema (they are read by ``build_params``)."""
    properties = schema.setdefault("properties", {})
    for name in _INSTANCE_PARAMETERS:
        properties[name] = {"title": name, **PARAMETERS[name].json_schema()}
    schema["additionalProperties"] = False


class ExplainInstance(BaseModel):
    """An image and the explain parameters of /explain, as fields (lists for the repeatable
    ones); the parameters go to ``build_params`` as sent, like the form's and OIP's."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_document_parameters)
    image: B64
    class_idx: int | None = Field(None, description="class to explain; default top-1")

    def params(self, class_idx: tuple[int, ...]) -> ExplainParams:
        return build_params(
            self.model_extra or {}, accepted=_INSTANCE_PARAMETERS, fixed={"class_idx": class_idx}
        )


class _Instances(BaseModel):
    """``instances`` (or its synonym ``inputs``): one object per image."""

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, value: Any) -> Any:
        if isinstance(value, dict) and "inputs" in value:
            if "instances" in value:
                raise ValueError("send either 'instances' or 'inputs', not both")
            value = {**value, "instances": value["inputs"]}
            del value["inputs"]
        return value


class PredictRequest(_Instances):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"instances": [{"image": {"b64": EXAMPLE_IMAGE_B64}}]}]},
    )
    instances: list[PredictInstance] = Field(min_length=1)


class ExplainRequest(_Instances):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "instances": [
                        {
                            "image": {"b64": EXAMPLE_IMAGE_B64},
                            "method": "GradCAM",
                            "output": "overlay",
                        }
                    ]
                }
            ]
        },
    )
    instances: list[ExplainInstance] = Field(min_length=1)


class PredictAnswer(BaseModel):
    predictions: list[PredictResult]


class InstanceExplanation(ExplainResult):
    """camserve's explanation of one image, with what the method ran on."""

    model: str
    method: str
    target_layers: list[str]
    options: dict[str, Any]
    image_format: str
    media_type: str


class ExplainAnswer(BaseModel):
    explanations: list[InstanceExplanation]


def _groups(keys: Sequence[Any]) -> list[list[int]]:
    """Indices of equal keys, in order of first appearance: one explainer call per group."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _names(count: int) -> list[str]:
    return [f"instance{i}" for i in range(count)]


@router.get("")
def list_models(registry: ModelRegistry = Depends(get_registry)) -> dict[str, list[str]]:
    """The names of the models of the store."""
    return {"models": registry.names()}


router.add_api_route("/{name:model}", get_model_ready, methods=["GET"], responses=ERROR_RESPONSES)


@router.post("/{name}:predict", response_model=PredictAnswer, responses=ERROR_RESPONSES)
async def predict_instances(
    name: str,
    body: PredictRequest,
    request: Request,
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> PredictAnswer:
    """Top-k classes per instance, through the same batched forward as /predict."""
    explainer.registry.get(name)  # an unknown model is named before any image is looked at
    uploads = decode_images(
        list(zip(_names(len(body.instances)), [i.image.b64 for i in body.instances], strict=True)),
        settings,
    )

    async def run() -> dict[int, PredictResult]:
        results: dict[int, PredictResult] = {}
        for group in _groups([instance.top_k for instance in body.instances]):
            top_k = body.instances[group[0]].top_k
            answer = await explainer.predict(name, [uploads[i] for i in group], top_k)
            results.update(zip(group, answer.results, strict=True))
        return results

    # One deadline (CAMSERVE_REQUEST_TIMEOUT_S) for the whole request, whatever its groups.
    results = await within_limits(request, run())
    return PredictAnswer(predictions=[results[i] for i in range(len(uploads))])


@router.post("/{name}:explain", response_model=ExplainAnswer, responses=ERROR_RESPONSES)
async def explain_instances(
    name: str,
    body: ExplainRequest,
    request: Request,
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> ExplainAnswer:
    """camserve's explanation of each instance; its fields are /explain's options."""
    explainer.registry.get(name)  # an unknown model is named before any image is looked at
    instances = body.instances
    uploads = decode_images(
        list(zip(_names(len(instances)), [i.image.b64 for i in instances], strict=True)), settings
    )
    # Instances with equal options (and all with or all without class_idx) share one call.
    keys = [
        (i.model_dump_json(exclude={"image", "class_idx"}), i.class_idx is None) for i in instances
    ]

    groups = _groups(keys)
    params = [
        instances[group[0]].params(
            tuple(c for i in group if (c := instances[i].class_idx) is not None)
        )
        for group in groups
    ]
    # The groups together against one request's budgets: splitting the options must not split them.
    await explainer.check_together(
        name, [([uploads[i] for i in group], p) for group, p in zip(groups, params, strict=True)]
    )

    async def run() -> dict[int, InstanceExplanation]:
        explanations: dict[int, InstanceExplanation] = {}
        for group, group_params in zip(groups, params, strict=True):
            answer = await explainer.explain(name, [uploads[i] for i in group], group_params)
            for index, result in zip(group, answer.results, strict=True):
                explanations[index] = InstanceExplanation(
                    **result.model_dump(),
                    model=answer.model,
                    method=answer.method,
                    target_layers=answer.target_layers,
                    options=answer.options,
                    image_format=answer.image_format,
                    media_type=answer.media_type,
                )
        return explanations

    explanations = await within_limits(request, run())
    return ExplainAnswer(explanations=[explanations[i] for i in range(len(instances))])
