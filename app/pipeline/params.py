"""Explain parameters, declared once and built in one place for every protocol.

``PARAMETERS`` holds every parameter a client may send with an explanation: the general ones
declared here (``method``, ``class_idx``, ``top_k``, ...) and every public method option,
gathered from the methods' own declarations (``app.cam.options``), so that an option a method
adds is accepted everywhere at once. The native form, KServe's ``:explain`` instances, OIP's
``parameters`` and ``/jobs`` only map their wire format to a plain mapping of raw values;
``build_params`` turns that mapping into ``ExplainParams``, or refuses it with one
``InvalidParameter`` message, whatever the protocol. A method option is checked against the
method(s) it goes to (type and bounds) by the explainer, once the model says which method runs.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from app.cam import METHODS
from app.errors import InvalidParameter, clip
from app.pipeline.checks import option_takers
from app.pipeline.explainer import ExplainParams
from app.pipeline.rendering import (
    DEFAULT_ALPHA,
    DEFAULT_COLORMAP,
    DEFAULT_IMAGE_FORMAT,
    MAX_SIDE,
    MIN_SIDE,
    OUTPUT_FORMATS,
    OUTPUT_KINDS,
)

#: How a raw value is read: one string, strings (repeated or comma-separated), an integer,
#: integers (repeated or comma-separated), a number, a boolean, or a size (a word or pixels).
Kind = Literal["str", "strs", "int", "ints", "float", "bool", "size"]

_JSON_TYPES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "strs": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "int": {"type": "integer"},
    "ints": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "size": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
}
_KINDS: dict[type, Kind] = {str: "str", int: "int", float: "float", list: "ints"}


@dataclass(frozen=True)
class ExplainParameter:
    """One parameter of an explanation, as every protocol accepts it."""

    name: str
    kind: Kind
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    example: Any = None
    option: bool = False
    """A method option: its bounds depend on the method, so the explainer checks them."""

    def hints(self) -> dict[str, Any]:
        """JSON-schema keywords that document (not enforce) the bounds, choices and example."""
        hints: dict[str, Any] = {
            "minimum": self.low,
            "maximum": self.high,
            "enum": list(self.choices) or None,
            "examples": None if self.example is None else [self.example],
        }
        return {key: value for key, value in hints.items() if value is not None}

    def json_schema(self) -> dict[str, Any]:
        """The parameter's JSON schema as a JSON body (KServe's instance, OIP's parameters)."""
        schema = {**_JSON_TYPES[self.kind], "description": self.help, **self.hints()}
        if self.kind == "ints" and self.example is not None:
            schema["examples"] = [[int(v) for v in self.example]]  # the form's are strings
        if self.default not in (None, ()):
            schema["default"] = self.default
        return schema

    def read(self, value: Any) -> Any:
        """The raw value as ``ExplainParams`` holds it; ``InvalidParameter`` names the problem."""
        read = _READERS[self.kind](self.name, value)
        if isinstance(read, int | float) and not self.option:
            self._check_bounds(read)
        return read

    def _check_bounds(self, value: float) -> None:
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise InvalidParameter(
                f"{self.name} must lie in [{_number(self.low)}, {_number(self.high)}], "
                f"got {value!r}.",
                details={"parameter": self.name},
            )


def _number(value: float | None) -> str:
    if value is None:
        return "inf"
    return str(int(value)) if float(value).is_integer() else str(value)


def _refuse(name: str, wanted: str, value: Any) -> InvalidParameter:
    return InvalidParameter(
        f"{name} must be {wanted}, got {clip(value)}.", details={"parameter": name}
    )


def _parts(name: str, value: Any, item: type, what: str) -> list[Any]:
    """A repeated or comma-separated value, split: strings are split at commas."""
    values = value if isinstance(value, list | tuple) else [value]
    parts: list[Any] = []
    for one in values:
        if isinstance(one, str):
            parts.extend(part.strip() for part in one.split(",") if part.strip())
        elif isinstance(one, item) and not isinstance(one, bool):
            parts.append(one)
        else:
            raise _refuse(name, what, value)
    return parts


def _read_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _refuse(name, "a string", value)
    return value


def _read_strs(name: str, value: Any) -> tuple[str, ...]:
    return tuple(_parts(name, value, str, "a string or a list of strings"))


def _read_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, "an integer", value)
    return value


def _read_ints(name: str, value: Any) -> tuple[int, ...]:
    try:
        return tuple(
            int(part) for part in _parts(name, value, int, "an integer or a list of integers")
        )
    except ValueError:
        raise _refuse(
            name, "integers (repeat the field, separate by commas or send a list)", value
        ) from None


def _read_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(name, "a number", value)
    if not math.isfinite(value):
        raise _refuse(name, "a finite number", value)
    return float(value)


def _read_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(name, "true or false", value)
    return value


def _read_size(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _refuse(name, "'original', 'input' or a number of pixels", value)
    return str(value)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _from_text(name: str, kind: Kind, text: str) -> Any:
    try:
        if kind == "int":
            return int(text.strip())
        if kind == "float":
            return float(text.strip())
    except ValueError:
        raise _refuse(name, "an integer" if kind == "int" else "a number", text) from None
    if kind == "bool":
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise _refuse(name, "true or false", text)
        return word in _TRUE
    return text


def read_text(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values that arrive as text (a command line, a query string), typed by each parameter's
    kind as the form's fields are, so that ``build_params`` reads them like any protocol's.
    Unknown names pass through for ``build_params`` to refuse."""
    return {
        name: _from_text(name, PARAMETERS[name].kind, value)
        if isinstance(value, str) and name in PARAMETERS
        else value
        for name, value in values.items()
    }


_READERS = {
    "str": _read_str,
    "strs": _read_strs,
    "int": _read_int,
    "ints": _read_ints,
    "float": _read_float,
    "bool": _read_bool,
    "size": _read_size,
}

GENERAL: tuple[ExplainParameter, ...] = (
    ExplainParameter(
        "method",
        "strs",
        None,
        "CAM method, case-insensitive; default: the model's. Several (repeat the field or "
        "separate by commas) give one explanation per method",
        example=["GradCAM"],
    ),
    ExplainParameter(
        "class_idx",
        "ints",
        (),
        "class to explain: one for all images or one per image; default top-1",
        example=["3"],
    ),
    ExplainParameter("top_k", "int", 5, "predictions returned per image", 1, 1000),
    ExplainParameter(
        "target_layer",
        "strs",
        (),
        "layer(s) to explain (repeatable); several add a fused map",
        example=["layer3"],
    ),
    ExplainParameter(
        "output",
        "strs",
        ("overlay",),
        f"any of {', '.join(OUTPUT_KINDS)} (repeat or comma list)",
        example=["overlay", "raw"],
    ),
    ExplainParameter("colormap", "str", DEFAULT_COLORMAP, "jet, viridis, inferno, turbo, hot, ..."),
    ExplainParameter("alpha", "float", DEFAULT_ALPHA, "weight of the image in overlays", 0, 1),
    ExplainParameter(
        "image_format",
        "str",
        DEFAULT_IMAGE_FORMAT,
        "encoding of overlays and heatmaps; png is lossless",
        choices=tuple(OUTPUT_FORMATS),
    ),
    ExplainParameter(
        "size",
        "size",
        None,
        f"size of overlays and heatmaps: 'original', 'input' (the model's crop) or a longest "
        f"side in pixels ({MIN_SIDE}-{MAX_SIDE}); default: the upload's size, scaled down to "
        "CAMSERVE_MAX_OUTPUT_SIDE",
        example="512",
    ),
    ExplainParameter("normalized", "bool", True, "raw maps min-max scaled to [0, 1]"),
)


def _from_option(name: str) -> ExplainParameter:
    """One parameter for a method option, from every method's declaration of it."""
    takers = option_takers(name)
    first = takers[0][1]
    lows = [o.low for _, o in takers if o.low is not None]
    highs = [o.high for _, o in takers if o.high is not None]
    taken_by = ", ".join(
        method + ("" if option.default is None else f" ({option.default})")
        for method, option in takers
    )
    return ExplainParameter(
        name,
        _KINDS[first.type],
        None,
        f"{first.help}; taken by {taken_by}",
        low=min(lows) if lows else None,
        high=max(highs) if highs else None,
        example=["3"] if first.type is list else None,
        option=True,
    )


OPTION_NAMES: tuple[str, ...] = tuple(
    dict.fromkeys(o.name for cls in METHODS.values() for o in cls.options if o.public)
)
"""Every public method option (num_samples, std, batch_size, seed, gamma, ...)."""

PARAMETERS: dict[str, ExplainParameter] = {
    p.name: p for p in (*GENERAL, *(_from_option(name) for name in OPTION_NAMES))
}
"""Every explain parameter, general ones first, then the methods' options."""


def build_params(
    values: Mapping[str, Any],
    *,
    accepted: Collection[str] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> ExplainParams:
    """``ExplainParams`` from raw values as a protocol received them (``None``: not sent).

    ``accepted`` narrows the general parameters a protocol takes (every method option is always
    taken); ``fixed`` are values the protocol sets itself (after the check of the client's)."""
    sent = {name: value for name, value in values.items() if value is not None}
    _refuse_unknown(sent, accepted)
    sent.update(fixed or {})
    read = {name: PARAMETERS[name].read(value) for name, value in sent.items()}

    def general(name: str) -> Any:
        return read.get(name, PARAMETERS[name].default)

    return ExplainParams(
        method=",".join(general("method") or ()) or None,
        class_idx=general("class_idx"),
        top_k=general("top_k"),
        target_layers=general("target_layer"),
        outputs=tuple(o.lower() for o in general("output")) or ("overlay",),
        colormap=general("colormap").strip().lower(),
        alpha=general("alpha"),
        image_format=general("image_format").strip().lower(),
        normalized=general("normalized"),
        size=general("size"),
        options={name: value for name, value in read.items() if PARAMETERS[name].option},
    )


def _refuse_unknown(sent: Mapping[str, Any], accepted: Collection[str] | None) -> None:
    allowed = [
        name
        for name, parameter in PARAMETERS.items()
        if parameter.option or accepted is None or name in accepted
    ]
    unknown = [name for name in sent if name not in allowed]
    if unknown:
        raise InvalidParameter(
            f"Unknown explain parameter {clip(unknown[0])}; the parameters are "
            f"{', '.join(allowed)}.",
            details={"parameter": unknown[0][:40], "allowed": allowed},
        )
