"""What the service says about a method: its docstring's first line, its forwards, its slowness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.cam import METHODS
from app.models.loading import LoadedModel, load_model
from app.models.manifest import parse_manifest
from app.pipeline.checks import extra_forwards
from app.pipeline.describe import SLOW_FORWARDS, describe, summary
from tests.fixtures_models import fixture_access


@pytest.fixture(scope="module")
def tiny(store: Path) -> LoadedModel:
    """3 classes; ``features`` (4 channels) is its target layer."""
    manifest = parse_manifest(store / "tiny", access=fixture_access(store))
    return load_model(manifest, torch.device("cpu"))


@pytest.mark.parametrize("method", list(METHODS))
def test_the_summary_is_one_line_that_names_the_method(method: str) -> None:
    text = summary(METHODS[method])
    assert text and "\n" not in text and text == text.strip()
    assert (METHODS[method].__doc__ or "").strip().startswith(text)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_cost_is_the_budgets_count_at_the_defaults(tiny: LoadedModel, method: str) -> None:
    cls = METHODS[method]
    note = describe(tiny, cls)
    assert note.forwards == extra_forwards(tiny, cls, tiny.target_layers, {}, 1).total
    assert note.slow == (note.forwards - cls.own_forwards >= SLOW_FORWARDS)
    # Slow exactly when the method runs forwards of its own: those are what report progress.
    assert note.slow == bool(cls.masked_forwards or cls.noisy_forwards)


def test_counts_follow_the_layer_and_the_samples(tiny: LoadedModel) -> None:
    channels = tiny.layer_shapes[tiny.target_layers[0]][1]
    assert describe(tiny, METHODS["ScoreCAM"]).forwards == channels
    assert describe(tiny, METHODS["ISCAM"]).forwards == channels * 10
    assert describe(tiny, METHODS["SmoothGradCAMpp"]).forwards == 4
    assert describe(tiny, METHODS["GradCAM"]) == (summary(METHODS["GradCAM"]), 0, False)
    guided = METHODS["GuidedBackprop"]
    assert describe(tiny, guided) == (summary(guided), 1, False)  # its guided pass, not slow
