"""One explanation request, as the client and the command line describe it: the form fields it
becomes for a server, or the ``ExplainParams`` it becomes for the pipeline in this process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.cam import METHODS
from app.pipeline.explainer import ExplainParams
from app.pipeline.params import build_params, read_text
from app.pipeline.rendering import DEFAULT_IMAGE_FORMAT


@dataclass(frozen=True)
class ExplainRequest:
    """What to explain and how; ``fields`` holds any other form field of /explain (``colormap``,
    ``alpha``, ``top_k``, ``normalized``) and the methods' options (``num_samples``, ...): a
    value, or a list of texts for a field given several times."""

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
        form += [(name, text) for name, value in self.fields.items() for text in _texts(value)]
        return form

    def params(self) -> ExplainParams:
        """The same request for the pipeline, built by the one builder every protocol uses
        (``app.pipeline.params``). Raises ``InvalidParameter`` for a field /explain does not have
        or a value it would refuse."""
        values: dict[str, Any] = {
            "method": list(self.methods) or None,
            "class_idx": list(self.class_idx) or None,
            "target_layer": list(self.target_layers) or None,
            "output": list(self.outputs),
            "image_format": self.image_format,
            "size": self.size,
            **self.fields,
        }
        return build_params(read_text(values))

    @property
    def runs_long(self) -> bool:
        """Whether a method asked for runs many forwards per image (the Score-CAM family,
        Ablation-CAM, SmoothGrad-CAM++), or ROAD is asked for: such work reports its progress,
        and a server runs it as a job. Unknown names are left for the service to refuse."""
        wanted = {name.strip().lower() for name in self.methods}
        if "road" in str(self.fields.get("faithfulness", "")).lower():
            return True  # ROAD runs only as a job
        return any(
            cls.masked_forwards or cls.noisy_forwards
            for name, cls in METHODS.items()
            if name.lower() in wanted
        )


def _texts(value: Any) -> list[str]:
    """A field's form parts: a list of texts is a field given several times (``-O`` repeated),
    sent as repeated parts for the service to read, or refuse, as it reads any form."""
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return [_form_value(value)]


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def split_names(values: Sequence[str]) -> tuple[str, ...]:
    """``["GradCAM,ScoreCAM", "CAM"]`` -> ``("GradCAM", "ScoreCAM", "CAM")``."""
    return tuple(p.strip() for value in values for p in value.split(",") if p.strip())
