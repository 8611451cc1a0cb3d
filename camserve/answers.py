"""The service's answers with their pictures and maps opened: ``.overlay`` is a PIL image and
``.raw`` a numpy array. The data underneath are the server's own pydantic models
(``app.pipeline.results``), so the client and the service cannot disagree on a field."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from app.pipeline.results import (
    Detection,
    ExplainResponse,
    ExplainResult,
    Explanation,
    Prediction,
    Segment,
)


@dataclass(frozen=True)
class MethodMaps:
    """One method's explanation of one image. Its ``overlay``, ``heatmap`` and ``raw`` are those
    of the last map: the fused one when several layers were explained, else the only one."""

    explanation: Explanation

    @property
    def method(self) -> str:
        return self.explanation.method

    @property
    def class_idx(self) -> int:
        return self.explanation.class_idx

    @property
    def label(self) -> str:
        return self.explanation.label

    @property
    def probability(self) -> float:
        return self.explanation.probability

    @property
    def detection(self) -> int | None:
        """A detector's: the index of the explained box in the image's ``detections``."""
        return self.explanation.detection

    @property
    def box(self) -> list[float] | None:
        """A detector's explained box, or a segmenter's region's bounds: [x0, y0, x1, y1] in
        the upload's pixels."""
        return self.explanation.box

    @property
    def score(self) -> float | None:
        """A detector's: the explained box's score."""
        return self.explanation.score

    @property
    def region(self) -> str | None:
        """A segmenter's: the explained region's kind (``mask``, ``box``, ``png``)."""
        return self.explanation.region

    def map_fields(self, index: int = -1) -> dict[str, Any]:
        """The fields of map ``index`` (MapOutput's fields come from the output kinds)."""
        fields: dict[str, Any] = self.explanation.maps[index].model_dump()
        return fields

    @property
    def faithfulness(self) -> dict[str, dict[str, Any]] | None:
        """Each map's faithfulness scores by layer (``fused`` for the fusion), the metrics that
        were not asked for left out; None unless ``faithfulness`` was asked for."""
        scored = {
            m.layer: m.faithfulness.model_dump(exclude_none=True)
            for m in self.explanation.maps
            if m.faithfulness is not None
        }
        return scored or None

    @property
    def overlay(self) -> Image.Image | None:
        """The map blended over the image (None unless ``overlay`` was asked for)."""
        return _picture(self.map_fields()["overlay"])

    @property
    def heatmap(self) -> Image.Image | None:
        """The coloured map alone (None unless ``heatmap`` was asked for)."""
        return _picture(self.map_fields()["heatmap"])

    @property
    def raw(self) -> np.ndarray | None:
        """The map's values at the layer's resolution, float32 (None unless ``raw`` was asked
        for)."""
        raw = self.map_fields()["raw"]
        return None if raw is None else np.asarray(raw["values"], dtype=np.float32)


@dataclass(frozen=True)
class Explained:
    """The explanation of one image: its predictions and one ``MethodMaps`` per method.
    ``overlay``, ``heatmap`` and ``raw`` are the first method's; ``explained["ScoreCAM"]``
    gives another's. ``response`` is the whole answer of the service."""

    response: ExplainResponse
    index: int = 0

    @property
    def result(self) -> ExplainResult:
        return self.response.results[self.index]

    @property
    def predictions(self) -> list[Prediction]:
        return self.result.predictions

    @property
    def detections(self) -> list[Detection] | None:
        """A detector's boxes of the explained pass, best first (None for other models)."""
        return self.result.detections

    @property
    def segments(self) -> list[Segment] | None:
        """A segmenter's classes present, largest first (None for other models)."""
        return self.result.segments

    @property
    def methods(self) -> dict[str, MethodMaps]:
        """Each method's (first) explanation; with several classes, ``explanations`` has all."""
        first: dict[str, MethodMaps] = {}
        for explanation in self.result.explanations:
            first.setdefault(explanation.method, MethodMaps(explanation))
        return first

    @property
    def explanations(self) -> list[MethodMaps]:
        """Every explanation, method by method and, within a method, class by class (several
        with ``classes`` or ``top_classes``)."""
        return [MethodMaps(e) for e in self.result.explanations]

    def __getitem__(self, method: str) -> MethodMaps:
        for name, maps in self.methods.items():
            if name.lower() == method.lower():
                return maps
        raise KeyError(f"{method!r} was not asked for; methods: {', '.join(self.methods)}")

    @property
    def first(self) -> MethodMaps:
        return MethodMaps(self.result.explanations[0])

    @property
    def overlay(self) -> Image.Image | None:
        return self.first.overlay

    @property
    def heatmap(self) -> Image.Image | None:
        return self.first.heatmap

    @property
    def raw(self) -> np.ndarray | None:
        return self.first.raw


def _picture(encoded: str | None) -> Image.Image | None:
    if encoded is None:
        return None
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    image.load()
    return image
