"""The KServe v1 codec: ``instances`` (or ``inputs``) of base64 images, with the explain
parameters as each instance's fields, and the answers' shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.pipeline.explainer import ExplainParams
from app.pipeline.params import PARAMETERS, build_params
from app.pipeline.results import ExplainResult, PredictResult
from app.protocols.images import EXAMPLE_IMAGE_B64

ALIVE = {"status": "alive"}
"""KServe v1's liveness answer at ``GET /``."""


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


def groups(keys: Sequence[Any]) -> list[list[int]]:
    """Indices of equal keys, in order of first appearance: one explainer call per group."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def names(count: int) -> list[str]:
    return [f"instance{i}" for i in range(count)]
