"""DFF's concepts through the explainer: one map and top labels per concept, drawn like maps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from app.errors import InvalidParameter
from app.models.registry import ModelRegistry
from app.pipeline.admission import SlotLimiter
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from tests.conftest import image_bytes
from tests.fixtures_models import fixture_access


@pytest.fixture(scope="module")
def registry(store: Path) -> ModelRegistry:
    registry = ModelRegistry(store, torch.device("cpu"), "tiny", access=fixture_access(store))
    registry.discover()
    registry.load_all()
    return registry


def _explain(registry: ModelRegistry, params: ExplainParams):  # type: ignore[no-untyped-def]
    explainer = Explainer(registry, SlotLimiter(max_running=1, max_waiting=4), 10**7)

    async def run():  # type: ignore[no-untyped-def]
        try:
            uploads = [Upload(f"{s}.png", image_bytes(seed=s)) for s in (1, 2)]
            return await explainer.explain("tiny", uploads, params)
        finally:
            await explainer.close()

    return asyncio.run(run())


def test_dff_answers_each_concept_with_its_map_and_top_labels(registry: ModelRegistry) -> None:
    params = ExplainParams(
        method="DFF", outputs=("raw", "overlay"), top_k=2, options={"n_components": 3}
    )
    answer = _explain(registry, params)
    assert answer.options == {"n_components": 3}
    for result in answer.results:
        (explanation,) = result.explanations
        assert [m.kind for m in explanation.maps] == ["layer"]
        concepts = explanation.concepts
        assert concepts is not None and [c.index for c in concepts] == [0, 1, 2]
        for concept in concepts:
            assert concept.map.kind == "concept" and concept.map.layer == "features"
            assert concept.map.overlay and concept.map.raw.shape == [32, 32]
            assert len(concept.top_labels) == 2
            probabilities = [label.probability for label in concept.top_labels]
            assert probabilities == sorted(probabilities, reverse=True)
    # The map served for the class is one of the concepts' maps.
    first = answer.results[0].explanations[0]
    served = first.maps[0].raw.values
    assert any(c.map.raw.values == served for c in first.concepts or [])


def test_other_methods_answer_no_concepts(registry: ModelRegistry) -> None:
    answer = _explain(registry, ExplainParams(method="GradCAM,GuidedBackprop", outputs=("raw",)))
    for explanation in answer.results[0].explanations:
        assert explanation.concepts is None
    guided = answer.results[0].explanations[1]
    assert guided.maps[0].kind == "fused" and guided.maps[0].raw.shape == [32, 32]


def test_more_concepts_than_channels_is_refused_before_the_pass(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidParameter, match="n_components=5 is more concepts than"):
        _explain(registry, ExplainParams(method="DFF", options={"n_components": 5}))


def test_n_components_on_another_method_is_refused(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidParameter, match="GradCAM does not take the option 'n_components'"):
        _explain(registry, ExplainParams(method="GradCAM", options={"n_components": 2}))
