"""KServe v1 protocol over HTTP: ``:predict`` and ``:explain`` (the codec is
``app.protocols.kserve``)."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Depends, Request

from app.http.cutoff import PROTOCOL_ADVICE
from app.http.deps import (
    get_explainer,
    get_registry,
    get_settings,
    job_owner,
    require_api_key,
    within_limits,
)
from app.http.protocols.base import ERROR_RESPONSES, ProtocolRoute, get_model_ready
from app.models.registry import ModelRegistry
from app.pipeline.explainer import Explainer
from app.pipeline.results import PredictResult
from app.protocols.images import decode_images
from app.protocols.kserve import (
    ALIVE,
    ExplainAnswer,
    ExplainRequest,
    InstanceExplanation,
    PredictAnswer,
    PredictRequest,
    groups,
    names,
)
from app.settings import Settings

router = APIRouter(
    prefix="/v1/models",
    tags=["kserve v1 protocol"],
    route_class=ProtocolRoute,
    dependencies=[Depends(require_api_key)],
)


root_router = APIRouter(include_in_schema=False)


@root_router.get("/")
def get_alive() -> dict[str, str]:
    """KServe v1's liveness (without the page at /, CAMSERVE_UI=false)."""
    return ALIVE


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
    # Off the event loop, as the OIP route decodes its base64 (seconds for a full request).
    uploads = await anyio.to_thread.run_sync(
        decode_images,
        list(zip(names(len(body.instances)), [i.image.b64 for i in body.instances], strict=True)),
        settings,
    )

    async def run() -> dict[int, PredictResult]:
        results: dict[int, PredictResult] = {}
        for group in groups([instance.top_k for instance in body.instances]):
            top_k = body.instances[group[0]].top_k
            answer = await explainer.predict(name, [uploads[i] for i in group], top_k)
            results.update(zip(group, answer.results, strict=True))
        return results

    # One deadline (CAMSERVE_REQUEST_TIMEOUT_S) for the whole request, whatever its groups.
    results = await within_limits(request, run(), advice=PROTOCOL_ADVICE)
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
    uploads = await anyio.to_thread.run_sync(
        decode_images,
        list(zip(names(len(instances)), [i.image.b64 for i in instances], strict=True)),
        settings,
    )
    # Instances with equal options (and all with or all without class_idx) share one call.
    keys = [
        (i.model_dump_json(exclude={"image", "class_idx"}), i.class_idx is None) for i in instances
    ]

    grouped = groups(keys)
    params = [
        instances[group[0]].params(
            tuple(c for i in group if (c := instances[i].class_idx) is not None)
        )
        for group in grouped
    ]
    # The groups together against one request's budgets: splitting the options must not split them.
    await explainer.check_together(
        name, [([uploads[i] for i in group], p) for group, p in zip(grouped, params, strict=True)]
    )

    async def run() -> dict[int, InstanceExplanation]:
        explanations: dict[int, InstanceExplanation] = {}
        for group, group_params in zip(grouped, params, strict=True):
            answer = await explainer.explain(
                name, [uploads[i] for i in group], group_params, scope=job_owner(request)
            )
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

    explanations = await within_limits(request, run(), advice=PROTOCOL_ADVICE)
    return ExplainAnswer(explanations=[explanations[i] for i in range(len(instances))])
