"""Class sensitivity: on images holding two shapes of different classes, does the map of each
class land on that class's own object?

For every image both present classes are explained, whatever the model predicts:
* discriminative pointing game: the map's maximum lies in the explained class's own object;
* energy share: energy in the own object / energy in both objects (0.5: no preference);
* map correlation: Spearman correlation between the two classes' maps (1: the same map whatever
  the class, as the Score-CAM softmax bug gave);
* pointing on either object, to tell "finds objects but not which one" from "finds nothing".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.cam import resize_maps
from app.cam.faithfulness import spearman_correlation
from app.cam.localization import energy_pointing_game, pointing_game
from bench.quality.data import BenchModel, to_input

logger = logging.getLogger("bench.cam_quality")

#: ``maps_for(images, classes) -> maps (N, h, w)``
MapsFor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PairSet:
    """Two-shape images, their two objects' masks and the two classes, in the same order."""

    images: torch.Tensor  # (N, 3, H, W), model input
    masks: torch.Tensor  # (N, 2, H, W) bool, disjoint
    labels: torch.Tensor  # (N, 2) long, different classes

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def head(self, n: int) -> PairSet:
        return PairSet(self.images[:n], self.masks[:n], self.labels[:n])


def pair_set(bench: BenchModel, n: int, seed: int) -> PairSet:
    from app.models.zoo.shapes_dataset import make_pairs

    images, masks, labels = make_pairs(n, seed, bench.image_size)
    return PairSet(
        to_input(images, bench.mean, bench.std),
        torch.from_numpy(masks),
        torch.from_numpy(labels),
    )


@dataclass(frozen=True)
class SensitivityRow:
    """A row of the class-sensitivity table: a method or a baseline, on ``n`` pair images."""

    name: str
    description: str
    n: int
    maps_for: MapsFor


def _energy_share(maps: torch.Tensor, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    e_own = energy_pointing_game(maps, own)
    e_other = energy_pointing_game(maps, other)
    both = e_own + e_other
    return torch.where(both > 0, e_own / both.clamp_min(1e-12), torch.full_like(both, 0.5))


def evaluate(row: SensitivityRow, pairs: PairSet) -> dict[str, Any]:
    """The row's class-sensitivity metrics over the first ``row.n`` pair images."""
    subset = pairs.head(row.n)
    started = time.perf_counter()
    first = row.maps_for(subset.images, subset.labels[:, 0]).float()
    second = row.maps_for(subset.images, subset.labels[:, 1]).float()
    seconds = time.perf_counter() - started
    own_first, own_second = subset.masks[:, 0], subset.masks[:, 1]
    either = own_first | own_second
    pointing = torch.cat([pointing_game(first, own_first), pointing_game(second, own_second)])
    on_either = torch.cat([pointing_game(first, either), pointing_game(second, either)])
    share = torch.cat(
        [_energy_share(first, own_first, own_second), _energy_share(second, own_second, own_first)]
    )
    size = tuple(first.shape[1:])
    correlation = spearman_correlation(resize_maps(first, size), resize_maps(second, size))
    result = {
        "name": row.name,
        "description": row.description,
        "n_images": len(subset),
        "discriminative_pointing_game": float(pointing.float().mean()),
        "pointing_on_either_object": float(on_either.float().mean()),
        "own_energy_share": float(share.mean()),
        "map_correlation_between_classes": float(correlation.mean()),
        "seconds": round(seconds, 1),
    }
    logger.info(
        "class sensitivity %s: DPG %.3f share %.3f rho %.3f either %.3f (%.1fs)",
        row.name,
        result["discriminative_pointing_game"],
        result["own_energy_share"],
        result["map_correlation_between_classes"],
        result["pointing_on_either_object"],
        seconds,
    )
    return result
