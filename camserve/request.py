"""One explanation request, as the client and the command line describe it: the form fields it
becomes for a server, or the ``ExplainParams`` it becomes for the pipeline in this process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.cam import METHODS
from app.errors import InvalidParameter
from app.pipeline.explainer import ExplainParams
from app.pipeline.rendering import DEFAULT_IMAGE_FORMAT

#: The form fields of /explain that are not method options, with their ExplainParams names.
_FIELDS = {
    "top_k": "top_k",
    "colormap": "colormap",
    "alpha": "alpha",
    "normalized": "normalized",
}


@dataclass(frozen=True)
class ExplainRequest:
    """What to explain and how; ``fields`` holds any other form field of /explain (``colormap``,
    ``alpha``, ``top_k``, ``normalized``) and the methods' options (``num_samples``, ...)."""

    methods: tuple[str, ...] = ()
    model: str | None = None
    class_idx: tuple[int, ...] = ()
    target_layers: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("overlay", "raw")
    image_format: str = DEFAULT_IMAGE_FORMAT
    size: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def form(self) -> list[tuple[str, str]]:
        """The multipart form fields of /explain and /jobs (the files aside)."""
        form = [("method", ",".join(self.methods))] if self.methods else []
        form += [("model", self.model)] if self.model else []
        form += [("class_idx", str(idx)) for idx in self.class_idx]
        form += [("target_layer", layer) for layer in self.target_layers]
        form += [("output", ",".join(self.outputs)), ("image_format", self.image_format)]
        form += [("size", self.size)] if self.size else []
        form += [(name, _form_value(value)) for name, value in self.fields.items()]
        return form

    def params(self) -> ExplainParams:
        """The same request for the pipeline: each field typed as the form would type it.
        Raises ``InvalidParameter`` for a field /explain does not have."""
        plain = {_FIELDS[k]: _typed_field(k, v) for k, v in self.fields.items() if k in _FIELDS}
        options = {k: _typed_option(k, v) for k, v in self.fields.items() if k not in _FIELDS}
        return ExplainParams(
            method=",".join(self.methods) or None,
            class_idx=self.class_idx,
            target_layers=self.target_layers,
            outputs=tuple(o.strip().lower() for o in self.outputs),
            image_format=self.image_format,
            size=self.size,
            options=options,
            **plain,
        )

    @property
    def runs_long(self) -> bool:
        """Whether a method asked for runs many forwards per image (the Score-CAM family,
        Ablation-CAM, SmoothGrad-CAM++): such work reports its progress, and a server runs it
        as a job. Unknown names are left for the service to refuse."""
        wanted = {name.strip().lower() for name in self.methods}
        return any(
            cls.masked_forwards or cls.noisy_forwards
            for name, cls in METHODS.items()
            if name.lower() in wanted
        )


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _typed_field(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if name == "top_k":
            return int(value)
        if name == "alpha":
            return float(value)
    except ValueError:
        raise InvalidParameter(f"{name} must be a number, got {value!r}.") from None
    if name == "normalized":
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise InvalidParameter(f"normalized must be true or false, got {value!r}.")
        return value.strip().lower() in ("true", "1", "yes", "on")
    return value.strip().lower() if name == "colormap" else value


def _typed_option(name: str, value: Any) -> Any:
    """A method option's value with the type its declaration gives (``"8"`` -> 8)."""
    declared = next(
        (o for cls in METHODS.values() if (o := cls.option(name)) is not None and o.public), None
    )
    if declared is None:
        known = sorted({o.name for c in METHODS.values() for o in c.options if o.public})
        raise InvalidParameter(
            f"No method takes the option {name!r}. Options: {', '.join(known)}, and the fields "
            f"{', '.join(_FIELDS)}.",
            details={"option": name},
        )
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    try:
        if declared.type is list:
            return tuple(int(v) for v in value.split(",") if v.strip())
        return declared.type(value.strip())
    except ValueError:
        raise InvalidParameter(
            f"{name} must be {_type_name(declared.type)}, got {value!r}.", details={"option": name}
        ) from None


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", list: "integers"}.get(kind, "text")


def split_names(values: Sequence[str]) -> tuple[str, ...]:
    """``["GradCAM,ScoreCAM", "CAM"]`` -> ``("GradCAM", "ScoreCAM", "CAM")``."""
    return tuple(p.strip() for value in values for p in value.split(",") if p.strip())
