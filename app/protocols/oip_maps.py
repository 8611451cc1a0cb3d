"""The Open Inference Protocol's ``cam`` output, as a classifier's and a detector's or
segmenter's answers give it: one row per explanation (the fused map when there are several
layers), image after image, with what made the maps as the output's parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.pipeline.results import ExplainResponse, MapOutput
from app.protocols.tensors import OutputTensor, one_size


def map_tensor(name: str, answer: ExplainResponse, rows: dict[str, Any]) -> OutputTensor:
    """Every explanation's map, stacked (refused when they differ in shape: a detector's or
    segmenter's images of several sizes), with the method, its layers, ``normalized``, the
    options it ran with and the maps' faithfulness scores (when asked for) as parameters, and
    ``rows``: what each row explains (comma-separated: a parameter holds no list)."""
    maps = [e.maps[-1] for result in answer.results for e in result.explanations]
    raws = [m.model_dump(include={"raw"})["raw"] for m in maps]
    one_size(name, [tuple(raw["shape"]) for raw in raws])
    options = {
        option: ",".join(map(str, value)) if isinstance(value, list | tuple) else value
        for option, value in answer.options.items()
    }
    # No explanation at all (``box=all`` on images without a detection): an empty tensor.
    made = {"layer": maps[0].layer, "normalized": raws[0]["normalized"]} if maps else {}
    return OutputTensor(
        name=name,
        datatype="FP32",
        shape=(len(raws), *raws[0]["shape"]) if raws else (0, 0, 0),
        values=[value for raw in raws for row in raw["values"] for value in row],
        parameters={
            "method": answer.method,
            "target_layers": ",".join(answer.target_layers),
            **made,
            **rows,
            **options,
            **_scores(maps),
        },
    )


def _scores(maps: Sequence[MapOutput]) -> dict[str, Any]:
    """The maps' faithfulness scores (when asked for), each as one value per row separated by
    commas, like ``class_idx`` (``confidence_increase`` as ``true``/``false``)."""
    scored = [m.faithfulness for m in maps]
    if not scored or any(score is None for score in scored):
        return {}
    fields = [s.model_dump(exclude_none=True) for s in scored if s is not None]
    shown: dict[str, Any] = {}
    for name, value in fields[0].items():
        if name in ("steps", "road_percentiles"):
            shown[f"faithfulness_{name}" if name == "steps" else name] = (
                value if name == "steps" else ",".join(map(str, value))
            )
        else:
            shown[name] = ",".join(_text(f[name]) for f in fields)
    return shown


def _text(value: Any) -> str:
    """A score as text: a number as Python writes it, a truth as JSON does (``true``)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
