"""Explain parameters, declared once and built in one place for every protocol.

``PARAMETERS`` holds every parameter a client may send with an explanation: the general ones
declared here (``method``, ``class_idx``, ``top_k``, ...) and every public method option,
gathered from the methods' own declarations (``app.cam.options``), so that an option a method
adds is accepted everywhere at once. The native form, KServe's ``:explain`` instances, OIP's
``parameters`` and ``/jobs`` only map their wire format to a plain mapping of raw values;
``build_params`` turns that mapping into ``ExplainParams``, or refuses it with one
``InvalidParameter`` message, whatever the protocol. A method option is checked against the
method(s) it goes to (type and bounds) by the explainer, once the model says which method runs.

The one rule of reading, for every protocol: a name that is no parameter is refused (with the
close matches), as is a one-value parameter sent twice, a value of the wrong type (a JSON
``true`` is no integer), a number written with other than ASCII digits, and a number beyond
what its kind can hold. Those are ``MalformedParameter`` (400); a readable value out of its
bounds is an ``InvalidParameter`` (422).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.cam import METHODS
from app.digits import number_text
from app.errors import InvalidParameter, MalformedParameter, clip
from app.pipeline.checks import option_takers
from app.pipeline.classes import MAX_CLASSES
from app.pipeline.explainer import ExplainParams
from app.pipeline.faithfulness import DEFAULT_STEPS, MAX_STEPS, METRICS
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
Kind = Literal["str", "strs", "int", "ints", "float", "bool", "size", "picks"]

_JSON_TYPES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "strs": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "int": {"type": "integer"},
    "ints": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "size": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "picks": {
        "anyOf": [
            {"type": "integer"},
            {"type": "string"},
            {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
        ]
    },
}
_KINDS: dict[type, Kind] = {str: "str", int: "int", float: "float", bool: "bool", list: "ints"}
#: The kinds that take several values (a repeated field, a comma list or a JSON list).
MANY: tuple[Kind, ...] = ("strs", "ints", "picks")
#: What a multipart form part holds for each kind, in the form's schema (its ints are text).
_FORM_TYPES: dict[str, dict[str, Any]] = {
    **_JSON_TYPES,
    "strs": {"type": "array", "items": {"type": "string"}},
    "ints": {"type": "array", "items": {"type": "string"}},
    "size": {"type": "string"},
    "picks": {"type": "array", "items": {"type": "string"}},
}


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
    strict: bool = False
    """Checked here against its choices and bounds, and refused with a 400 that lists what is
    allowed (the faithfulness parameters: no later stage reads them before the passes run)."""

    def hints(self) -> dict[str, Any]:
        """JSON-schema keywords that document (not enforce) the bounds, choices and example. A
        list's choices go on its strings (``_with_choices``), not here."""
        hints: dict[str, Any] = {
            "minimum": self.low,
            "maximum": self.high,
            "enum": (list(self.choices) or None) if self.kind not in MANY else None,
            "examples": None if self.example is None else [self.example],
        }
        return {key: value for key, value in hints.items() if value is not None}

    def _with_choices(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` (a list kind's) with each of its strings held to the choices as the
        server reads them: any case, separated by commas (``choices_pattern``)."""
        if not self.choices or self.kind not in MANY:
            return schema
        pattern = choices_pattern(self.choices)

        def held(part: dict[str, Any]) -> dict[str, Any]:
            if part.get("type") == "string":
                return {**part, "pattern": pattern}
            if part.get("type") == "array":
                return {**part, "items": held(part["items"])}
            if "anyOf" in part:
                return {**part, "anyOf": [held(p) for p in part["anyOf"]]}
            return part

        return held(schema)

    def json_schema(self) -> dict[str, Any]:
        """The parameter's JSON schema as a JSON body (KServe's instance, OIP's parameters)."""
        typed = self._with_choices(_JSON_TYPES[self.kind])
        schema = {**typed, "description": self.help, **self.hints()}
        if self.kind == "ints" and self.example is not None:
            schema["examples"] = [[int(v) for v in self.example]]  # the form's are strings
        if self.default not in (None, ()):
            schema["default"] = self.default
        return schema

    def form_schema(self) -> dict[str, Any]:
        """The parameter's JSON schema as a multipart form field (text, repeatable if several)."""
        schema = {**self._with_choices(_FORM_TYPES[self.kind]), **self.hints()}
        if self.kind not in MANY and not self.option and self.default is not None:
            schema["default"] = self.default
        return schema

    def read(self, value: Any) -> Any:
        """The raw value as ``ExplainParams`` holds it; ``InvalidParameter`` names the problem."""
        try:
            read = _READERS[self.kind](self.name, value)
        except MalformedParameter as error:
            if not self.choices:
                raise
            # A value of the wrong type (``true`` for a list of names) hears the names too.
            raise MalformedParameter(
                f"{error.message.rstrip('.')}; the allowed values are {', '.join(self.choices)} "
                "(repeat the field or separate by commas).",
                details={"parameter": self.name, "allowed": list(self.choices)},
            ) from None
        if self.strict:
            self._check_strictly(read)
        elif isinstance(read, int | float) and not self.option:
            self._check_bounds(read)
        return read

    def _check_strictly(self, value: Any) -> None:
        """A strict parameter's value against its choices (case-insensitive) and bounds."""
        if self.choices:
            wrong = [v for v in value if v.strip().lower() not in self.choices]
            if wrong:
                raise MalformedParameter(
                    f"Unknown {self.name} value {clip(wrong[0])}; the allowed values are "
                    f"{', '.join(self.choices)} (repeat the field or separate by commas).",
                    details={"parameter": self.name, "allowed": list(self.choices)},
                )
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                self._check_bounds(value)
            except InvalidParameter as error:
                raise MalformedParameter(
                    error.message, details={"parameter": self.name, "allowed": self.bounds_text()}
                ) from None

    def bounds_text(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        return f"[{low}, {_number(self.high)}]"

    def _check_bounds(self, value: float) -> None:
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise InvalidParameter(
                f"{self.name} must lie in {self.bounds_text()}, got {_shown(value)}.",
                details={"parameter": self.name},
            )


def _number(value: float | None) -> str:
    if value is None:
        return "inf"
    return str(int(value)) if float(value).is_integer() else str(value)


def _shown(value: float) -> str:
    """A number for a message: a huge integer by its length, not its thousands of digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return number_text(value, most_digits=38)
    return repr(value)


def _refuse(name: str, wanted: str, value: Any) -> MalformedParameter:
    return MalformedParameter(
        f"{name} must be {wanted}, got {clip(value)}.", details={"parameter": name}
    )


def _out_of_range(name: str, shown: str) -> MalformedParameter:
    """A number its kind cannot hold (beyond a float's range, or thousands of digits)."""
    parameter = PARAMETERS.get(name)
    bounds = f" in {parameter.bounds_text()}" if parameter is not None else ""
    return MalformedParameter(
        f"{name} must be a finite number{bounds}, got {shown}.", details={"parameter": name}
    )


def _not_ascii(name: str, text: str) -> MalformedParameter:
    return MalformedParameter(
        f"{name} must be written with ASCII digits (0-9), got {clip(text)}.",
        details={"parameter": name},
    )


def choices_pattern(choices: Sequence[str]) -> str:
    """A JSON-schema pattern (ECMA regex, which has no case flag) of what a list parameter's
    string may hold, as ``_parts`` splits it: choices in any case, separated by commas, with
    spaces and empty parts around them."""

    def any_case(choice: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in choice)

    item = "(?:" + "|".join(any_case(choice) for choice in choices) + ")"
    return rf"^[\s,]*(?:{item}(?:\s*,[\s,]*{item})*)?[\s,]*$"


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


def _read_picks(name: str, value: Any) -> tuple[str, ...]:
    """Indices (integers or their text) or words such as ``all``, as text: ``box``."""
    return tuple(str(part) for part in _parts(name, value, int, "indices or 'all'"))


def _read_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(name, "an integer", value)
    return value


def _read_ints(name: str, value: Any) -> tuple[int, ...]:
    parts = _parts(name, value, int, "an integer or a list of integers")
    return tuple(
        part
        if isinstance(part, int)
        else _int_text(
            name, part, "integers (repeat the field, separate by commas or send a list)", value
        )
        for part in parts
    )


def _read_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(name, "a number", value)
    try:
        number = float(value)  # an integer beyond 1e308 overflows here
    except OverflowError:
        raise _out_of_range(name, _shown(value)) from None
    if not math.isfinite(number):
        raise _out_of_range(name, clip(value))
    return number


def _read_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(name, "true or false", value)
    return value


def _read_size(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _refuse(name, "'original', 'input' or a number of pixels", value)
    if isinstance(value, str) and any(c.isdigit() for c in value) and not value.isascii():
        raise _not_ascii(name, value)  # the size's own check reads digits with int()
    return str(value)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _int_text(name: str, text: str, wanted: str, sent: Any) -> int:
    """An integer written in ASCII digits (Python's ``int`` also reads other scripts' digits,
    underscores and spaces)."""
    stripped = text.strip()
    if not stripped.isascii():
        raise _not_ascii(name, text)
    if not _INT_TEXT.fullmatch(stripped):
        raise _refuse(name, wanted, sent)
    try:
        return int(stripped)
    except ValueError:  # more digits than Python converts (4,300)
        raise _out_of_range(name, f"a number of {len(stripped)} characters") from None


def _float_text(name: str, text: str) -> float:
    stripped = text.strip()
    if not stripped.isascii():
        raise _not_ascii(name, text)
    if not _FLOAT_TEXT.fullmatch(stripped):
        raise _refuse(name, "a number", text)
    number = float(stripped)
    if not math.isfinite(number):  # "1e999", or hundreds of digits
        raise _out_of_range(name, clip(text))
    return number


def _from_text(name: str, kind: Kind, text: str) -> Any:
    if kind == "int":
        return _int_text(name, text, "an integer", text)
    if kind == "float":
        return _float_text(name, text)
    if kind == "bool":
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise _refuse(name, "true or false", text)
        return word in _TRUE
    return text


def one_value(name: str, values: Sequence[Any]) -> Any:
    """The value of a field that takes one (``None`` if none was sent); ``MalformedParameter``
    if it was sent several times, rather than a silent choice of one of them."""
    sent = [value for value in values if value != ""]  # an empty part: not sent, as in a form
    if len(sent) > 1:
        raise MalformedParameter(
            f"{name} was sent {len(sent)} times; it takes one value. Send it once.",
            details={"parameter": name[:40]},
        )
    return sent[0] if sent else None


def _texts(name: str, kind: Kind, texts: Sequence[str]) -> Any:
    """The values of a repeated field (a form's parts, a repeated command-line option): kept
    as a list for a parameter that takes several, refused for one that takes one."""
    if kind in MANY:
        return [text for text in texts if text != ""] or None
    text = one_value(name, texts)
    return None if text is None else _from_text(name, kind, text)


def read_text(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values that arrive as text (a form, a command line), typed by each parameter's kind, so
    that ``build_params`` reads them like any protocol's. A list holds a repeated field's
    values; an empty string is a field not sent. Unknown names pass through for
    ``build_params`` to refuse."""
    read: dict[str, Any] = {}
    for name, value in values.items():
        parameter = PARAMETERS.get(name)
        if parameter is None or not isinstance(value, str | list | tuple):
            read[name] = value
        elif isinstance(value, str):
            read[name] = None if value == "" else _from_text(name, parameter.kind, value)
        elif all(isinstance(text, str) for text in value):
            read[name] = _texts(name, parameter.kind, value)
        else:
            read[name] = value  # JSON-typed items: the kind's reader checks them
    return read


_READERS = {
    "str": _read_str,
    "strs": _read_strs,
    "int": _read_int,
    "ints": _read_ints,
    "float": _read_float,
    "bool": _read_bool,
    "size": _read_size,
    "picks": _read_picks,
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
    ExplainParameter(
        "classes",
        "ints",
        (),
        "classes to explain for every image, one explanation per class and method (repeat "
        "or comma list); instead of class_idx",
        example=["3", "5"],
    ),
    ExplainParameter(
        "top_classes",
        "int",
        None,
        "explain the K most probable classes of each image (a segmenter's: its K largest but "
        "the background), one explanation per class and method; instead of class_idx",
        1,
        MAX_CLASSES,
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
    ExplainParameter(
        "faithfulness",
        "strs",
        (),
        "score each map: deletion and insertion AUC (RISE), confidence (the probability "
        "kept by the image times its map, 2 forwards) or road (ROAD, in /jobs only); repeat "
        "or comma list",
        choices=METRICS,
        example=["deletion", "insertion"],
        strict=True,
    ),
    ExplainParameter(
        "faithfulness_steps",
        "int",
        DEFAULT_STEPS,
        "steps of the deletion and insertion curves: each curve is one pass of steps + 1 "
        "forwards per map and image",
        1,
        MAX_STEPS,
        strict=True,
    ),
    ExplainParameter(
        "box",
        "picks",
        (),
        "detection models: the detection(s) to explain, by index in /predict's detections "
        "(repeatable), or 'all' (up to 10); default the top one",
        example=["0"],
    ),
    ExplainParameter(
        "region",
        "str",
        None,
        "segmentation models: where class_idx is explained: 'mask' (its predicted mask, the "
        "default), 'box:x0,y0,x1,y1' (upload pixels) or 'png:<base64 PNG>' (a mask of the "
        "upload's size, non-zero inside)",
        example="box:0,0,32,32",
    ),
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
    if first.type is bool:  # a switch, off unless sent: the methods' names say enough
        others = [method for method in METHODS if method not in dict(takers)]
        taken_by = "every method" + (f" but {', '.join(others)}" if others else "")
    return ExplainParameter(
        name,
        _KINDS[first.type],
        None,
        f"{first.help}; taken by {taken_by}",
        low=min(lows) if lows else None,
        high=max(highs) if highs else None,
        choices=first.choices,
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
    others: Collection[str] = (),
) -> ExplainParams:
    """``ExplainParams`` from raw values as a protocol received them (``None``: not sent).

    ``values`` holds every name the client sent that the protocol does not read itself, known
    or not: an unknown one is refused here. ``accepted`` narrows the general parameters a
    protocol takes (every method option is always taken); ``fixed`` are values the protocol
    sets itself (after the check of the client's); ``others`` are the names the protocol reads
    itself (``model``, the file), offered when a name is misspelt."""
    sent = {name: value for name, value in values.items() if value is not None}
    _refuse_unknown(sent, accepted, others)
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
        classes=general("classes"),
        top_classes=general("top_classes"),
        faithfulness=tuple(dict.fromkeys(m.strip().lower() for m in general("faithfulness"))),
        faithfulness_steps=general("faithfulness_steps"),
        boxes=general("box"),
        region=general("region"),
    )


#: Longest name compared with the parameters' for a "did you mean" (a longer one is no typo).
_TYPO_LIMIT = 64


def _refuse_unknown(
    sent: Mapping[str, Any], accepted: Collection[str] | None, others: Collection[str]
) -> None:
    allowed = [
        name
        for name, parameter in PARAMETERS.items()
        if parameter.option or accepted is None or name in accepted
    ]
    unknown = [name for name in sent if name not in allowed]
    if unknown:
        raise unknown_name(unknown[0], allowed, others)


def unknown_name(
    name: str,
    allowed: Sequence[str],
    others: Collection[str] = (),
    what: tuple[str, str] = ("explain parameter", "parameters"),
) -> MalformedParameter:
    """The refusal of a name that is none of ``allowed``, with the close matches among them and
    ``others`` (names the protocol reads itself); ``what`` names one and all of them."""
    close = (
        difflib.get_close_matches(name.lower(), [*allowed, *others], n=3, cutoff=0.6)
        if len(name) <= _TYPO_LIMIT
        else []
    )
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return MalformedParameter(
        f"Unknown {what[0]} {clip(name)}{hint}; the {what[1]} are {', '.join(allowed)}.",
        details={"parameter": name[:40], "allowed": list(allowed), "did_you_mean": close},
    )
