"""How the service describes a method to whoever picks one: what it is, and what it costs.

Both come from declarations that exist for other reasons: the summary is the first line of the
method's docstring (its name and paper), and the cost is the count of forwards of its own that
the budget check uses (``app.pipeline.checks.extra_forwards``), at the model's default target
layers and the method's default options, for one image.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

from app.cam.core import _CAM
from app.models.loading import LoadedModel
from app.pipeline.checks import extra_forwards

#: A method that runs at least this many forwards of its own per image (masked, ablated or
#: noisy inputs) is *slow*. Each such forward costs about a whole pass of the model, their number
#: grows with the layer's channels or the samples rather than with anything the client sees, and
#: only they report progress: so every method that runs any is one to run as a job.
SLOW_FORWARDS = 1


class MethodNote(NamedTuple):
    summary: str
    forwards: int
    slow: bool


def summary(cls: type[_CAM]) -> str:
    """The first line of the method's docstring."""
    return (inspect.getdoc(cls) or cls.__name__).splitlines()[0].strip()


def describe(model: LoadedModel, cls: type[_CAM]) -> MethodNote:
    """``cls`` on ``model``: its summary, its forwards per image at the defaults, whether slow."""
    forwards = extra_forwards(model, cls, model.target_layers, {}, 1).total
    # The guided pass (``own_forwards``) is one forward and backward, a gradient method's cost:
    # it counts in the budget, but it is not chunked and reports no progress.
    return MethodNote(summary(cls), forwards, forwards - cls.own_forwards >= SLOW_FORWARDS)
