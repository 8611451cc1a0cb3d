"""The faithfulness stage: how far to trust each map, scored after the CAM passes, on their lane.

A request that asks for ``faithfulness`` gets, for every map of every image, the scores of the
metrics it named (the engine's, ``app.cam.faithfulness``):

- ``deletion``: the area under the class probability while the map's most salient pixels are
  replaced by the data set's mean colour, ``steps`` at a time (RISE, Petsiuk et al. 2018);
  lower is better.
- ``insertion``: the area while they are copied into a blurred copy of the image; higher is
  better.
- ``confidence``: the class probability on the image multiplied by its map, against the
  image's (Grad-CAM++'s Average Drop and Increase in Confidence, Chattopadhyay et al. 2018,
  per map): the share of the probability lost (lower is better) and whether it rose. Two
  forwards a map: the cheap score.
- ``road``: the class probability once the most (MoRF) or least (LeRF) relevant 10 %, 20 %, ...,
  90 % of the pixels are removed and imputed (ROAD, Rong et al. 2022), averaged over the
  percentiles; MoRF lower, LeRF higher is better. Its imputation solves a linear system per
  input, so it runs only in a job (``check`` refuses it elsewhere), and the imputation runs on
  the image threads before the pass, not in it.

A classifier's map follows the probability of the class it explains (its softmax, or a
multi-label model's sigmoid: ``[model] probabilities``). A detector's follows the
explained detection's similarity to the detections of each perturbed input (D-RISE's: IoU x
class agreement x score, Petsiuk et al. 2021; for a detector that answers labels and scores
it starts at the detection's score), and a segmenter's the mean probability of its class over
the explained region (the answer's ``probability``): scores in [0, 1] both, so that the areas
read as a classifier's do.

Each curve is one forward of ``steps + 1`` inputs (one pass per curve and image), ``confidence``
one of 2 per image (each image and its explanation map, a map's images together), each ROAD
order one of 9. These are extra forwards like the Score-CAM family's: they count toward
``CAMSERVE_MAX_CAM_FORWARDS`` with the methods' own, and they run in a chunked pass of their
own (``Batcher.submit(chunked=True)``), so that the model's other passes get their turns at the
curves' boundaries and at the pauses inside their forwards, background work waits for
interactive work, a cancelled request stops at the next curve, and a job's progress counts them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from app.cam import CamInterrupted, ClassProbability, ProgressCallback, Target
from app.cam.core import Work
from app.cam.faithfulness import (
    ROAD_PERCENTILES,
    auc,
    confidence_change,
    confidence_drop,
    confidence_increase,
    perturbation_curve,
    road_inputs,
    road_probabilities,
)
from app.errors import BadRequest, InvalidParameter, OverBudget
from app.models.loading import LoadedModel
from app.pipeline.admission import run_stoppable
from app.pipeline.batching import Batcher, PassControl
from app.pipeline.passes import own_pass
from app.pipeline.results import ExplainResult, Faithfulness
from app.pipeline.scheduling import Priority

#: The metrics a request may name, in the order they are reported.
METRICS: tuple[str, ...] = ("deletion", "insertion", "confidence", "road")
#: The metrics that draw a curve of ``steps`` steps.
CURVES: tuple[str, ...] = ("deletion", "insertion")
CONFIDENCE_FORWARDS = 2
"""Forwards of ``confidence`` per map and image: the image and its explanation map."""
#: The metrics that only a job runs (their cost is in seconds per map, not forwards).
JOB_ONLY: tuple[str, ...] = ("road",)
DEFAULT_STEPS = 16
"""Steps of a curve by default: 17 inputs in one forward, 34 for both curves."""
MAX_STEPS = 64
"""The most steps a curve may take. A curve is one forward of ``steps + 1`` inputs, all held at
once on the model's device: 65 inputs of 224 x 224 keep a ResNet-50's activations near 1 GB,
and its two curves cost 130 forwards a map. Past 16 steps the AUC moves little (docs: the
shapes benchmark), so the bound costs nothing in resolution."""
PIXELS_PER_FORWARD = (MAX_STEPS + 1) * 224 * 224
"""The most input pixels one forward of the stage holds: a whole curve of ``MAX_STEPS`` at a
classifier's 224 x 224. A larger input (a detector's or segmenter's, up to its ``max_side``)
splits its curve (and ROAD's percentiles) into forwards of fewer inputs, so that no request can
make one forward hold tens of GB of activations: a curve of 1333 x 1000 inputs goes 2 at a time.
The forwards counted, and the scores, are the same."""
ROAD_MAX_PIXELS = 128 * 224 * 224
"""The most input pixels ROAD imputes for one request (its maps' input pixels, summed over
images and maps): 128 maps at 224 x 224, some 4 to 8 minutes of one core. The imputation runs
on the image threads, which interactive requests decode on: a detector's 1333-px inputs with
``box=all`` would hold one for 20 minutes a layer (about a minute per order and map)."""
ROAD_NOISE_STD = 0.01
"""Noise added to ROAD's imputed pixels, in the model's normalised input units."""
ROAD_SEED = 0
"""ROAD's noise is seeded: the same request gets the same scores."""


@dataclass(frozen=True)
class Scoring:
    """What a request asks the stage to score, and with how many steps."""

    metrics: tuple[str, ...]
    steps: int = DEFAULT_STEPS

    @property
    def curves(self) -> tuple[str, ...]:
        return tuple(m for m in CURVES if m in self.metrics)

    @property
    def road(self) -> bool:
        return "road" in self.metrics

    @property
    def confidence(self) -> bool:
        return "confidence" in self.metrics

    @property
    def forwards_per_map(self) -> int:
        """The forwards that scoring one map of one image runs."""
        road = 2 * len(ROAD_PERCENTILES) if self.road else 0
        confidence = CONFIDENCE_FORWARDS if self.confidence else 0
        return len(self.curves) * (self.steps + 1) + confidence + road

    def forwards(self, maps_per_image: int, images: int) -> int:
        return self.forwards_per_map * maps_per_image * images


def scoring(metrics: Sequence[str], steps: int = DEFAULT_STEPS) -> Scoring | None:
    """The stage's work for a request's ``faithfulness`` and ``faithfulness_steps``; None when
    it asked for none."""
    wanted = tuple(m for m in METRICS if m in metrics)
    return Scoring(wanted, steps) if wanted else None


def check(
    wanted: Scoring | None,
    maps_per_image: int,
    images: int,
    method_forwards: int,
    limit: int,
    job: bool,
    image_input: bool = True,
) -> int:
    """Refuse what the stage would not run: ROAD outside a job (400), a model whose input is no
    2-D image (``image_input`` False: volumes have no pixel order to delete in), and forwards
    that, with the methods' own (``method_forwards``), exceed ``limit``. The stage's forwards."""
    if wanted is None:
        return 0
    if not image_input:
        raise InvalidParameter(
            "faithfulness scores 2-D image maps; this model's input is not a 2-D image. "
            "Leave faithfulness out for it.",
            details={"parameter": "faithfulness"},
        )
    if not job and any(m in JOB_ONLY for m in wanted.metrics):
        raise BadRequest(
            "faithfulness=road runs only as a job: its imputation solves a linear system for "
            "every removed share of every map. Send the same request to POST /jobs, or ask "
            "for faithfulness=deletion,insertion here.",
            details={"parameter": "faithfulness", "jobs_only": list(JOB_ONLY)},
        )
    forwards = wanted.forwards(maps_per_image, images)
    if method_forwards + forwards > limit:
        fixes = ["lower faithfulness_steps"] if wanted.curves else []
        fixes.append(
            "send fewer images, layers, methods, classes or boxes (box=all counts the most "
            "boxes it may explain)"
        )
        if wanted.metrics != ("confidence",):
            fixes.append(
                f"ask for fewer metrics, or confidence alone ({CONFIDENCE_FORWARDS} forwards a map)"
            )
        advice = ", ".join(fixes[:-1]) + (", or " if len(fixes) > 1 else "") + fixes[-1]
        raise OverBudget(
            f"Scoring faithfulness ({', '.join(wanted.metrics)}) would run {forwards} forwards "
            f"({images} image(s) x {maps_per_image} map(s) x {wanted.forwards_per_map}), "
            f"{method_forwards + forwards} with the method's own; the limit is {limit} "
            f"(CAMSERVE_MAX_CAM_FORWARDS). {advice[0].upper()}{advice[1:]}.",
            details={"forwards": method_forwards + forwards, "limit": limit},
        )
    return forwards


ScoredBy = Sequence[int] | Sequence[Target]
"""Per image, what a map's curves follow: the class it explains (a classifier: the class's
probability), or its target's score in [0, 1] (a detector: the explained detection's similarity,
``DetectionSimilarity``; a segmenter: the class's mean probability over the region,
``RegionProbability``)."""


def class_objective(model: LoadedModel, class_idx: Sequence[int]) -> ScoredBy:
    """What a classifier's maps of ``class_idx`` (one class per image) follow: the class's
    probability by the model's rule (``[model] probabilities``): the class indices for a
    softmax (the engine's own path), a ``ClassProbability`` per image for a multi-label
    model's sigmoid."""
    kind = model.spec.probabilities
    if kind == "softmax":
        return tuple(class_idx)
    return tuple(ClassProbability(c, kind) for c in class_idx)


def _objective(scored_by: ScoredBy) -> tuple[list[int] | None, list[Target] | None]:
    """``scored_by`` as the engine's curves take it: (class_idx, None) or (None, targets)."""
    if not any(callable(c) for c in scored_by):  # class indices (ints of any kind)
        return [int(c) for c in scored_by], None  # type: ignore[arg-type]
    return None, list(scored_by)  # type: ignore[arg-type]


def check_road(wanted: Scoring | None, pixels: int) -> None:
    """Refuse (422) ROAD whose imputation would cover more than ``ROAD_MAX_PIXELS``:
    ``pixels`` is the model input's pixels of every map the request scores, summed."""
    if wanted is None or not wanted.road or pixels <= ROAD_MAX_PIXELS:
        return
    raise OverBudget(
        f"faithfulness=road would impute {pixels:,} input pixels (each map's model input, "
        f"over the request's images and maps); a request may impute {ROAD_MAX_PIXELS:,} "
        "(128 maps at 224 x 224). Explain fewer boxes, classes, layers or methods, send fewer "
        "or smaller images, or ask for faithfulness=deletion,insertion.",
        details={"parameter": "faithfulness", "pixels": pixels, "limit": ROAD_MAX_PIXELS},
    )


@dataclass(frozen=True)
class ScoreItem:
    """One request's share of a scoring pass: its inputs and the maps to score."""

    batch: torch.Tensor
    """(n, C, H, W) on the CPU."""
    maps: tuple[tuple[torch.Tensor, ScoredBy], ...]
    """Each map (n, h, w) with what it explains in each image."""
    road: tuple[dict[str, torch.Tensor], ...] = ()
    """Per map, ROAD's imputed inputs per order ((n, P, C, H, W)), made before the pass."""


def run_scoring_pass(
    model: LoadedModel,
    wanted: Scoring,
    items: Sequence[ScoreItem],
    control: PassControl | None = None,
) -> list[list[list[Faithfulness]]]:
    """The scores of every map of every item (per item, per map, per image), in one pass: each
    curve is one forward of ``steps + 1`` inputs, each ROAD order one of its percentiles. The
    pass reports its progress in forwards, lets the model's other passes run between its
    forwards and at the pauses inside them, and stops when all its callers are gone."""
    work = (
        Work() if control is None else Work(control.progress, control.at_boundary, control.at_pause)
    )

    def forward(x: torch.Tensor) -> Any:
        with work.pausable():
            output = model.module(x)
        work.advance(len(x))
        return output

    with own_pass(model), work.pause_points(model.module):
        work.begin(sum(wanted.forwards(len(i.maps), len(i.batch)) for i in items))
        return [_score_item(model, wanted, item, forward) for item in items]


def inputs_per_forward(inputs: int, height: int, width: int) -> int:
    """How many of a curve's ``inputs`` (each ``height`` x ``width``) one forward takes: all of
    them, or as many as ``PIXELS_PER_FORWARD`` holds (at least one)."""
    return max(1, min(inputs, PIXELS_PER_FORWARD // max(1, height * width)))


def _score_item(
    model: LoadedModel, wanted: Scoring, item: ScoreItem, forward: Any
) -> list[list[Faithfulness]]:
    x = item.batch.to(model.device)
    height, width = x.shape[-2:]
    curve_batch = inputs_per_forward(wanted.steps + 1, height, width)
    pair_batch = inputs_per_forward(CONFIDENCE_FORWARDS * len(x), height, width)
    road_batch = inputs_per_forward(len(ROAD_PERCENTILES), height, width)
    scored = []
    for index, (cams, scored_by) in enumerate(item.maps):
        classes, targets = _objective(scored_by)
        found: dict[str, list[float]] = {}
        for curve in wanted.curves:
            fractions, probs = perturbation_curve(
                forward, x, cams, classes, curve, wanted.steps, None, curve_batch, targets=targets
            )
            found[f"{curve}_auc"] = auc(fractions, probs).tolist()
        if wanted.confidence:
            before, after = confidence_change(
                forward, x, cams, classes, targets=targets, batch_size=pair_batch
            )
            found["confidence_drop"] = confidence_drop(before, after).tolist()
            found["confidence_increase"] = confidence_increase(before, after).tolist()
        for order, inputs in (item.road[index] if item.road else {}).items():
            probs = road_probabilities(
                forward, inputs.to(model.device), classes, targets=targets, batch_size=road_batch
            )
            found[f"road_{order}"] = probs.mean(dim=1).tolist()
        scored.append(
            [
                Faithfulness(
                    steps=wanted.steps if wanted.curves else None,
                    road_percentiles=list(ROAD_PERCENTILES) if wanted.road else None,
                    **{name: values[i] for name, values in found.items()},
                )
                for i in range(len(x))
            ]
        )
    return scored


def road_item(
    batch: torch.Tensor,
    maps: Sequence[torch.Tensor],
    stopped: Callable[[], bool] = lambda: False,
) -> tuple[dict[str, Any], ...]:
    """ROAD's imputed inputs for every map, on the CPU (before the pass: the imputation does
    not need the model, so it does not hold the model's lane). ``stopped`` is asked before each
    map's order (a second or so of one core at 224 x 224): a cancelled request stops there
    (``CamInterrupted``) rather than imputing every map first."""
    found = []
    for cams in maps:
        inputs = {}
        for order in ("morf", "lerf"):
            if stopped():
                raise CamInterrupted("ROAD's imputation stopped: its request was cancelled")
            inputs[order] = road_inputs(
                batch, cams, order, ROAD_PERCENTILES, ROAD_NOISE_STD, ROAD_SEED
            )
        found.append(inputs)
    return tuple(found)


@dataclass(frozen=True)
class Scored:
    """The stage's answer: per map (in the request's order of plans and maps), per image."""

    scores: list[list[Faithfulness]]
    seconds: float


async def score_maps(
    batcher: Batcher,
    model: LoadedModel,
    wanted: Scoring,
    batch: torch.Tensor,
    maps: Sequence[tuple[torch.Tensor, ScoredBy]],
    *,
    progress: ProgressCallback | None = None,
    priority: Priority = "interactive",
    threads: Executor | None = None,
) -> Scored:
    """Score ``maps`` (each (n, h, w), with what it explains in each image) of the images
    ``batch`` in one chunked pass on the model's batcher, after ROAD's imputation (when asked)
    on ``threads``."""
    started = time.perf_counter()
    road: tuple[dict[str, Any], ...] = ()
    if wanted.road:
        if progress is not None:  # the pass's forwards are known now: a job shows 0 of them,
            progress(0, wanted.forwards(len(maps), len(batch)))  # not 0 of 0, while imputing
        road = await run_stoppable(
            threads, lambda stopped: road_item(batch, [m for m, _ in maps], stopped)
        )
    item = ScoreItem(batch, tuple(maps), road)
    scores, _ = await batcher.submit(
        ("faithfulness", wanted),
        item,
        len(batch),
        partial(run_scoring_pass, model, wanted),
        batchable=False,
        progress=progress,
        priority=priority,
        chunked=True,
    )
    return Scored(scores, time.perf_counter() - started)


def attach(results: Sequence[ExplainResult], scored: Scored | None) -> None:
    """Give every map of ``results`` its scores (maps in the order they were scored)."""
    if scored is None:
        return
    for i, result in enumerate(results):
        maps = [m for explanation in result.explanations for m in explanation.maps]
        for output, per_image in zip(maps, scored.scores, strict=True):
            output.faithfulness = per_image[i]
