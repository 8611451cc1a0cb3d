"""The class-sensitivity metrics of the quality benchmark, on maps whose answer is known."""

from __future__ import annotations

import torch

from bench.quality.sensitivity import PairSet, SensitivityRow, evaluate


def _pairs() -> PairSet:
    masks = torch.zeros(3, 2, 16, 16, dtype=torch.bool)
    masks[:, 0, 2:6, 2:6] = True
    masks[:, 1, 9:14, 9:14] = True
    labels = torch.tensor([[0, 1], [2, 3], [4, 1]])
    return PairSet(torch.zeros(3, 3, 16, 16), masks, labels)


def test_an_oracle_scores_one_and_a_class_blind_map_does_not():
    pairs = _pairs()

    def oracle(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        first = (classes == pairs.labels[: len(classes), 0])[:, None, None]
        own = torch.where(first, pairs.masks[: len(classes), 0], pairs.masks[: len(classes), 1])
        return own.float()

    def blind(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return pairs.masks[: len(classes)].float().sum(1)

    good = evaluate(SensitivityRow("oracle", "own mask", 3, oracle), pairs)
    assert good["discriminative_pointing_game"] == 1.0
    assert good["own_energy_share"] == 1.0
    assert good["map_correlation_between_classes"] < 0
    bad = evaluate(SensitivityRow("blind", "both masks", 2, blind), pairs)
    assert bad["n_images"] == 2
    assert bad["own_energy_share"] == 0.5
    assert bad["map_correlation_between_classes"] == 1.0
    assert bad["pointing_on_either_object"] == 1.0
    assert bad["discriminative_pointing_game"] == 0.5  # the same maximum for both classes
