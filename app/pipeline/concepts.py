"""The concepts of a method that finds them (DFF), from its pass to the answer.

A concept's map is drawn like any map (``NamedMap`` of kind ``concept``, in the same render steps
and budget as the method's maps); its top labels come from the head's scores of the concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from app.cam import Concepts, class_probabilities
from app.models.loading import LoadedModel
from app.pipeline.passes import CamOutcome, CamPlan
from app.pipeline.rendering import NamedMap
from app.pipeline.results import Concept, ConceptLabel, MapOutput

CONCEPT: Final[Literal["concept"]] = "concept"


def concepts_per_image(plan: CamPlan) -> int:
    """The concept maps ``plan`` draws for each image: K per target layer (0 for a method
    without concepts)."""
    if not plan.cls.gives_concepts:
        return 0
    declared = plan.cls.option("n_components")
    k = dict(plan.options).get("n_components", declared.default if declared else 0)
    return int(k) * len(plan.layers)


def concept_maps(outcome: CamOutcome, normalized: bool) -> list[NamedMap]:
    """One ``NamedMap`` per concept and layer, in order (layer, then concept)."""
    return [
        NamedMap(found.layer, CONCEPT, found.maps[:, k], normalized)
        for found in outcome.concepts or ()
        for k in range(found.maps.shape[1])
    ]


def _top_labels(model: LoadedModel, scores: Any, top_k: int) -> list[ConceptLabel]:
    probabilities = class_probabilities(scores, model.spec.probabilities)
    top = probabilities.topk(min(top_k, scores.numel()))
    return [
        ConceptLabel(
            class_idx=int(i),
            label=model.labels[int(i)],
            score=float(scores[int(i)]),
            probability=float(p),
        )
        for p, i in zip(top.values, top.indices, strict=True)
    ]


def concept_answers(
    model: LoadedModel,
    found: Sequence[Concepts] | None,
    image: int,
    drawn: Sequence[dict[str, Any]],
    top_k: int,
) -> list[Concept] | None:
    """The concepts of image ``image``, with their drawn maps (the fields of ``MapOutput`` in
    ``concept_maps``'s order); ``None`` for a method without concepts."""
    if found is None:
        return None
    answers, fields = [], iter(drawn)
    for concepts in found:
        for k in range(concepts.maps.shape[1]):
            answers.append(
                Concept(
                    index=k,
                    top_labels=_top_labels(model, concepts.scores[image, k], top_k),
                    map=MapOutput(**next(fields)),
                )
            )
    return answers
