"""Which classes an explanation explains: the one rule shared by every protocol.

Three parameters choose them, at most one per request:

- ``class_idx`` (as before): one class for every image, or one per image in upload order;
- ``classes``: a list of classes explained for every image: one explanation per class and method;
- ``top_classes=K``: the K most probable classes of each image, most probable first.

Neither: each image's top-1 class. Asking for several classes never re-runs the model's forward
for another class (``app.cam.core._CAM.explain_classes``); the answer lists, for each image, the
explanations method by method and, within a method, class by class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from app.digits import number_text
from app.errors import MalformedParameter

MAX_CLASSES = 32
"""Most classes one request explains per image (``classes`` entries or ``top_classes``)."""

CHOOSERS = ("class_idx", "classes", "top_classes")
"""The parameters that choose the classes: a request sends at most one of them."""


class ClassChoice(Protocol):
    """What a request says about its classes (``ExplainParams`` and ``CamItem`` both do)."""

    @property
    def class_idx(self) -> tuple[int, ...]: ...

    @property
    def classes(self) -> tuple[int, ...]: ...

    @property
    def top_classes(self) -> int | None: ...


def class_count(choice: ClassChoice) -> int:
    """How many classes each image gets explained (K): 1 unless ``classes`` or
    ``top_classes`` asks for more."""
    if choice.classes:
        return len(choice.classes)
    return choice.top_classes or 1


def check_choice(choice: ClassChoice, model: str, num_classes: int) -> None:
    """Refuse (400) two ways of choosing classes at once, more classes than the model has or
    than ``MAX_CLASSES``, and a class of ``classes`` past the model's classes."""
    sent = [
        name
        for name, value in zip(
            CHOOSERS, (choice.class_idx, choice.classes, choice.top_classes), strict=True
        )
        if value
    ]
    if len(sent) > 1:
        raise MalformedParameter(
            f"{' and '.join(sent)} were both sent; choose the classes one way: class_idx (one "
            "for all images or one per image), classes (every listed class for every image) or "
            "top_classes (the K most probable of each image; a segmenter's K largest).",
            details={"parameter": sent[1], "allowed": list(CHOOSERS)},
        )
    count = class_count(choice)
    if count > min(num_classes, MAX_CLASSES):
        name = "classes" if choice.classes else "top_classes"
        limit = min(num_classes, MAX_CLASSES)
        raise MalformedParameter(
            f"{name} asks for {count} classes per image, but model {model!r} has {num_classes} "
            f"classes and a request explains at most {MAX_CLASSES}: ask for 1 to {limit}.",
            details={"parameter": name, "num_classes": num_classes, "limit": limit},
        )
    if len(set(choice.classes)) != len(choice.classes):
        raise MalformedParameter(
            f"classes {list(choice.classes)} names a class twice; list each class once.",
            details={"parameter": "classes"},
        )
    for idx in choice.classes:
        if not 0 <= idx < num_classes:
            raise MalformedParameter(
                f"classes holds {number_text(idx)}, out of range: model {model!r} has "
                f"{num_classes} classes "
                f"(0..{num_classes - 1}).",
                details={"parameter": "classes", "num_classes": num_classes},
            )


def per_image(choice: ClassChoice, scores: torch.Tensor) -> list[list[int]]:
    """For each image (a row of ``scores``), the classes it explains, in order."""
    rows = scores.shape[0]
    if choice.classes:
        return [list(choice.classes) for _ in range(rows)]
    if choice.top_classes:
        return scores.topk(choice.top_classes, dim=1).indices.tolist()
    top1 = scores.argmax(dim=1).tolist()
    if not choice.class_idx:
        return [[c] for c in top1]
    if len(choice.class_idx) == 1:
        return [[choice.class_idx[0]] for _ in range(rows)]
    return [[c] for c in choice.class_idx]


def by_rank(lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per-image class lists (K_i classes each) -> K lists with one class per image, K the
    longest; an image with fewer classes repeats its last one (its extra maps are dropped)."""
    count = max((len(classes) for classes in lists), default=1)
    return [[classes[min(k, len(classes) - 1)] for classes in lists] for k in range(count)]
