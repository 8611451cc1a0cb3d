"""Run predictions and CAM explanations off the event loop, one batched pass per request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import torch
from PIL import Image

from app import checks
from app.cam import heatmap, normalize_maps, overlay_mask
from app.device import synchronize
from app.errors import (
    MethodNotApplicable,
)
from app.imaging import (
    OUTPUT_FORMATS,
    Box,
    decode_image,
    encode_image,
    map_to_image,
    preprocess,
    to_base64,
)
from app.jobs import JobLimiter
from app.loading import LoadedModel
from app.registry import ModelRegistry
from app.schemas import (
    ExplainResponse,
    ExplainResult,
    ExplainTimings,
    Explanation,
    MapOutput,
    Prediction,
    PredictResponse,
    PredictResult,
    PredictTimings,
    RawMap,
)

FUSED = "fused"


@dataclass(frozen=True)
class Upload:
    """One uploaded file, already read and size-checked."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class ExplainParams:
    """Validated-by-type explain parameters; the explainer checks them against the model."""

    method: str | None = None
    class_idx: tuple[int, ...] = ()
    top_k: int = 5
    target_layers: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("overlay",)
    colormap: str = "jet"
    alpha: float = 0.7
    image_format: str = "png"
    normalized: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Decoded:
    images: list[Image.Image]
    batch: torch.Tensor
    boxes: list[Box]
    seconds: float


@dataclass
class _CamRun:
    logits: torch.Tensor
    class_idx: list[int]
    cams: list[torch.Tensor]
    fused: torch.Tensor | None
    queue_s: float
    forward_s: float
    cam_s: float


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Explainer:
    """Turns uploads into predictions and explanations for one registry of models."""

    def __init__(
        self,
        registry: ModelRegistry,
        limiter: JobLimiter,
        max_pixels: int,
        max_cam_forwards: int = 20_000,
    ) -> None:
        self.registry = registry
        self.limiter = limiter
        self.max_pixels = max_pixels
        self.max_cam_forwards = max_cam_forwards

    async def _decode(self, model: LoadedModel, uploads: Sequence[Upload]) -> _Decoded:
        def work() -> _Decoded:
            started = time.perf_counter()
            images = [decode_image(u.data, u.filename, self.max_pixels) for u in uploads]
            batch, boxes = preprocess(images, model.spec)
            return _Decoded(images, batch, boxes, time.perf_counter() - started)

        return await anyio.to_thread.run_sync(work)

    def _predictions(self, model: LoadedModel, logits: torch.Tensor, k: int) -> list[Prediction]:
        probs = logits.softmax(-1)
        top = probs.topk(min(k, logits.numel()))
        return [
            Prediction(
                class_idx=int(i),
                label=model.labels[int(i)],
                logit=float(logits[int(i)]),
                probability=float(p),
            )
            for p, i in zip(top.values, top.indices, strict=True)
        ]

    async def predict(
        self, model_name: str | None, uploads: Sequence[Upload], top_k: int
    ) -> PredictResponse:
        """Top-k classes for each upload, from one batched forward."""
        started = time.perf_counter()
        model = self.registry.get(model_name)
        decoded = await self._decode(model, uploads)
        submitted = time.perf_counter()

        def work() -> tuple[torch.Tensor, float, float]:
            with model.lock:
                queued = time.perf_counter() - submitted
                t0 = time.perf_counter()
                with torch.inference_mode():
                    logits = model.module(decoded.batch.to(model.device))
                synchronize(model.device)
                return logits.float().cpu(), queued, time.perf_counter() - t0

        logits, queued, forward = await self.limiter.run(work)
        results = [
            PredictResult(
                filename=upload.filename,
                width=image.width,
                height=image.height,
                predictions=self._predictions(model, row, top_k),
            )
            for upload, image, row in zip(uploads, decoded.images, logits, strict=True)
        ]
        timings = PredictTimings(
            decode_ms=_ms(decoded.seconds),
            queue_ms=_ms(queued),
            forward_ms=_ms(forward),
            total_ms=_ms(time.perf_counter() - started),
        )
        return PredictResponse(
            model=model.spec.name, device=str(model.device), timings=timings, results=results
        )

    async def explain(
        self, model_name: str | None, uploads: Sequence[Upload], params: ExplainParams
    ) -> ExplainResponse:
        """Predictions and class activation maps for every upload, from one batched pass."""
        started = time.perf_counter()
        model = self.registry.get(model_name)
        own_layers = bool(params.target_layers) and (
            tuple(dict.fromkeys(params.target_layers)) != model.target_layers
        )
        method, cls = checks.resolve_method(model, params.method, own_layers)
        options = checks.check_options(method, cls, params.options)
        if "fc_layer" in getattr(cls, "option_names", ()) and model.spec.fc_layer:
            options.setdefault("fc_layer", model.spec.fc_layer)
        layers = checks.check_layers(model, params.target_layers)
        checks.check_classes(model, params.class_idx, len(uploads))
        checks.check_rendering(params.outputs, params.image_format, params.colormap)
        checks.check_budget(
            model, method, cls, layers, options, len(uploads), self.max_cam_forwards
        )

        decoded = await self._decode(model, uploads)
        submitted = time.perf_counter()
        run = await self.limiter.run(
            lambda: self._run_cam(model, cls, decoded.batch, layers, params, options, submitted)
        )

        encode_started = time.perf_counter()
        results = await anyio.to_thread.run_sync(
            lambda: self._render(model, uploads, decoded, run, layers, params)
        )
        encoded = time.perf_counter() - encode_started
        timings = ExplainTimings(
            decode_ms=_ms(decoded.seconds),
            queue_ms=_ms(run.queue_s),
            forward_ms=_ms(run.forward_s),
            cam_ms=_ms(run.cam_s),
            encode_ms=_ms(encoded),
            total_ms=_ms(time.perf_counter() - started),
        )
        public_options = {k: v for k, v in options.items() if k in params.options}
        return ExplainResponse(
            model=model.spec.name,
            device=str(model.device),
            method=method,
            target_layers=list(layers),
            options=public_options,
            image_format=params.image_format,
            media_type=OUTPUT_FORMATS[params.image_format][1],
            timings=timings,
            results=results,
        )

    @staticmethod
    def _run_cam(
        model: LoadedModel,
        cls: type,
        batch: torch.Tensor,
        layers: tuple[str, ...],
        params: ExplainParams,
        options: dict[str, Any],
        submitted: float,
    ) -> _CamRun:
        with model.lock:
            queued = time.perf_counter() - submitted
            x = batch.to(model.device)
            mode = torch.enable_grad() if cls.requires_grad else torch.inference_mode()
            try:
                extractor = cls(
                    model.module,
                    target_layer=list(layers),
                    input_shape=model.spec.input_shape,
                    **options,
                )
            except ValueError as error:
                raise MethodNotApplicable(f"{cls.__name__} cannot run here: {error}") from None
            with extractor, mode:
                t0 = time.perf_counter()
                scores = model.module(x)
                synchronize(model.device)
                t1 = time.perf_counter()
                if params.class_idx:
                    idx = list(params.class_idx) * (len(x) if len(params.class_idx) == 1 else 1)
                else:
                    idx = scores.argmax(dim=1).tolist()
                try:
                    cams = extractor(idx, scores, normalized=params.normalized)
                    fused = None
                    if len(cams) > 1:
                        # Fusion takes the per-pixel max, which only means something on a
                        # common scale: fuse normalised maps even when raw ones were asked for.
                        scaled = cams if params.normalized else [normalize_maps(c) for c in cams]
                        fused = extractor.fuse_cams(scaled)
                except ValueError as error:
                    # Class indices were checked before: what is left is about the layers/head.
                    raise MethodNotApplicable(
                        f"{cls.__name__} cannot explain {', '.join(layers)}: {error}"
                    ) from None
                synchronize(model.device)
                t2 = time.perf_counter()
                return _CamRun(
                    logits=scores.detach().float().cpu(),
                    class_idx=idx,
                    cams=[c.detach().float().cpu() for c in cams],
                    fused=None if fused is None else fused.detach().float().cpu(),
                    queue_s=queued,
                    forward_s=t1 - t0,
                    cam_s=t2 - t1,
                )

    def _render(
        self,
        model: LoadedModel,
        uploads: Sequence[Upload],
        decoded: _Decoded,
        run: _CamRun,
        layers: tuple[str, ...],
        params: ExplainParams,
    ) -> list[ExplainResult]:
        named = [
            (layer, "layer", cams, params.normalized)
            for layer, cams in zip(layers, run.cams, strict=True)
        ]
        if run.fused is not None:
            named.append((FUSED, "fused", run.fused, True))
        results = []
        for i, (upload, image, box) in enumerate(
            zip(uploads, decoded.images, decoded.boxes, strict=True)
        ):
            maps = []
            for layer, kind, cams, is_normalized in named:
                cam = cams[i]
                output = MapOutput(layer=layer, kind=kind)
                if "raw" in params.outputs:
                    output.raw = RawMap(
                        shape=list(cam.shape), normalized=is_normalized, values=cam.tolist()
                    )
                if {"overlay", "heatmap"} & set(params.outputs):
                    mask = cam if is_normalized else normalize_maps(cam[None])[0]
                    if (round(box.left), round(box.top)) != (0, 0) or (
                        round(box.right),
                        round(box.bottom),
                    ) != image.size:
                        mask = map_to_image(mask, box, image.size)
                    if "overlay" in params.outputs:
                        picture = overlay_mask(image, mask, params.colormap, params.alpha)
                        output.overlay = to_base64(encode_image(picture, params.image_format))
                    if "heatmap" in params.outputs:
                        picture = heatmap(mask, image.size, params.colormap)
                        output.heatmap = to_base64(encode_image(picture, params.image_format))
                maps.append(output)
            logits = run.logits[i]
            target = run.class_idx[i]
            probability = float(logits.softmax(-1)[target])
            explanation = Explanation(
                class_idx=target,
                label=model.labels[target],
                logit=float(logits[target]),
                probability=probability,
                maps=maps,
            )
            results.append(
                ExplainResult(
                    filename=upload.filename,
                    width=image.width,
                    height=image.height,
                    predictions=self._predictions(model, logits, params.top_k),
                    logits=logits.tolist(),
                    explanations=[explanation],
                )
            )
        return results
