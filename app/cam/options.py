"""A method's options, declared once: name, type, default, bounds and help.

Each extractor class lists its ``options`` (``_CAM.option_names`` is derived from them); the
service derives from that one declaration its form fields, their checks, the budget,
``/models/{name}`` and the OpenAPI schema. The defaults are the constructors' (a test holds them
equal); the bounds are what the service accepts, the constructors only refuse invalid values.
``at="call"`` marks an option given when the extractor is called (FinerCAM's ``comparison_idx``)
rather than when it is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from app.digits import number_text


@dataclass(frozen=True)
class MethodOption:
    """One option of a CAM method."""

    name: str
    type: type  # int, float, str, bool, or list (of ints)
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    #: ``"init"``: a keyword of the constructor; ``"call"``: a keyword of the call
    at: Literal["init", "call"] = "init"
    #: whether a client of the service may set it (``fc_layer`` comes from the model's manifest)
    public: bool = True
    #: the values a ``str`` option takes (empty: any string)
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> Any:
        """``value`` if it has the option's type and lies within its bounds, else a
        ``ValueError`` (``TypeError`` for a wrong type) that names the option."""
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{self.name} must be true or false, got {value!r}.")
            return value
        if self.type is list:
            items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(items, list | tuple) or any(
                isinstance(v, bool) or not isinstance(v, int) for v in items
            ):
                raise TypeError(
                    f"{self.name} must be an int or a list of ints, got {_shown(value)}."
                )
            for item in items:
                self._check_bounds(item)
            return tuple(items)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            self._check_bounds(value)  # exact for any int; float() overflows past 1e308
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, self.type):
            raise TypeError(f"{self.name} must be {self.type.__name__}, got {_shown(value)}.")
        if self.choices and value not in self.choices:
            raise ValueError(
                f"{self.name} must be one of {', '.join(self.choices)}, got {str(value)[:40]!r}."
            )
        if isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):  # an int always is
                raise ValueError(f"{self.name} must be a finite number, got {value!r}.")
            self._check_bounds(value)
        return value

    def _check_bounds(self, value: float) -> None:
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise ValueError(
                f"{self.name} must lie in [{self.bounds_text()}], got {_shown(value)}."
            )

    def bounds_text(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{low}, {high}"

    def describe(self) -> dict[str, Any]:
        """Plain data for an API: name, type, default, bounds, help."""
        return {
            "name": self.name,
            "type": {
                int: "integer",
                float: "number",
                str: "string",
                bool: "boolean",
                list: "integer list",
            }[self.type],
            "default": self.default,
            "minimum": self.low,
            "maximum": self.high,
            "help": self.help,
            "choices": list(self.choices) or None,
        }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def num_samples(default: int, what: str) -> MethodOption:
    return MethodOption("num_samples", int, default, what, low=1, high=64)


def noise_std(default: float, what: str) -> MethodOption:
    return MethodOption("std", float, default, what, low=0.0, high=10.0)


SEED = MethodOption(
    "seed", int, None, "seeds the noise of every call (none: torch's global one)", 0, 2**32 - 1
)
BATCH_SIZE = MethodOption(
    "batch_size", int, 32, "masked inputs per forward (memory, not the result)", 1, 256
)
CHUNK_MS = MethodOption(
    "chunk_ms",
    float,
    20.0,
    "on CUDA, the device time a chunk of masked forwards aims at: chunks grow or shrink to it "
    "(batch_size is the first chunk's size), so other passes get turns that often; on CPU "
    "chunks keep batch_size",
    1.0,
    1000.0,
)
#: Masked inputs per chunk at most when chunk_ms sizes the chunks (CUDA).
MAX_TIMED_CHUNK = 256
PRECISION = MethodOption(
    "precision",
    str,
    "fp32",
    "number format of the masked forwards (the map's arithmetic stays fp32): bf16 is faster "
    "on GPUs with bf16 tensor cores and moves the map slightly",
    choices=("fp32", "bf16"),
)
FC_LAYER = MethodOption(
    "fc_layer",
    str,
    None,
    "the head CAM reads its class weights from: an nn.Linear or a 1x1 convolution",
    public=False,
)
GAMMA = MethodOption("gamma", float, 0.6, "weight of the reference classes' mean logit", 0.0, 10.0)
NUM_REFERENCES = MethodOption(
    "num_references", int, 3, "nearest classes to contrast with when none are given", 1, 64
)
COMPARISON_IDX = MethodOption(
    "comparison_idx",
    list,
    None,
    "the classes to contrast with, shared by the images (default: the nearest logits)",
    low=0,
    at="call",
)

EIGEN_SMOOTH = MethodOption(
    "eigen_smooth",
    bool,
    False,
    "replace the map by the first principal component of the weighted activations (one SVD "
    "per image and layer: denoises, costs no forward)",
    at="call",
)
AUG_SMOOTH = MethodOption(
    "aug_smooth",
    bool,
    False,
    "mean map over a horizontal flip x input scale 0.9/1.0/1.1: six variants in one batch, "
    "so six times the forwards (and backwards) of the method",
    at="call",
)
#: The options every map method takes, declared here once and added by ``_CAM`` to each.
SMOOTHING: tuple[MethodOption, ...] = (EIGEN_SMOOTH, AUG_SMOOTH)
SMOOTHING_NAMES: tuple[str, ...] = tuple(option.name for option in SMOOTHING)
#: How many variants ``aug_smooth`` runs: flip (no, yes) x input scale (0.9, 1.0, 1.1).
AUG_SCALES: tuple[float, ...] = (0.9, 1.0, 1.1)
AUG_VARIANTS = 2 * len(AUG_SCALES)

SCHEDULE = MethodOption(
    "schedule",
    str,
    "cumulative",
    "IS-CAM's mask scales: cumulative (the authors' code, i(i+1)/2n at step i) or linear (i/n)",
    choices=("cumulative", "linear"),
)


def _shown(value: object) -> str:
    """A refused value for a message: an int's digits (or its size, past 18 of them), else its
    ``repr`` cut to 40 characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        return number_text(value)
    try:
        text = repr(value)
    except ValueError:  # a list holding an int past str()'s 4,300 digits
        return f"a {type(value).__name__} holding a number too long to show"
    return text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
