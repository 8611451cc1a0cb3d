"""Where ``camserve explain`` puts its answers: one picture (and ``.npy`` raw map) per image and
method, and one ``results.jsonl`` line per image with its predictions and timings."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from camserve.answers import Explained, MethodMaps
from camserve.errors import ClientError

_SUFFIXES = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
RESULTS = "results.jsonl"
#: What a detector's or segmenter's explanation says it explains, kept in ``results.jsonl``.
_TASK_FIELDS = ("detection", "box", "score", "region")


def _each(maps: MethodMaps) -> str:
    """The file-name part of one of several explanations of a method: a detector's box (two
    boxes may be of one class), else the class."""
    return f".box{maps.detection}" if maps.detection is not None else f".class{maps.class_idx}"


class OutputFolder:
    """The output folder of one run; ``results.jsonl`` is started afresh."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.results = folder / RESULTS
        with self._writing():
            folder.mkdir(parents=True, exist_ok=True)
            self.results.write_text("")
        self._stems: set[str] = set()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """``ClientError`` ``output_not_writable``, naming the folder, for a failed write."""
        try:
            yield
        except OSError as error:
            reason = error.strerror or str(error)
            if isinstance(error, FileExistsError):
                reason = "a file of that name is in the way"
            raise ClientError(
                "output_not_writable",
                f"cannot write to the output folder {str(self.folder)!r} ({reason}); pick "
                "another with -o/--out, or make this one writable",
            ) from None

    def _stem(self, source: str) -> str:
        """A file name stem for ``source`` not used yet in this run (``a``, ``a-2``, ...)."""
        base = Path(source).stem or "image"
        stem, number = base, 1
        while stem in self._stems:
            number += 1
            stem = f"{base}-{number}"
        self._stems.add(stem)
        return stem

    def write(self, source: str, explained: Explained, via: str) -> dict[str, Any]:
        """Write the pictures and raw maps of ``explained``; return its ``results.jsonl`` line."""
        with self._writing():
            return self._write(source, explained, via)

    def _write(self, source: str, explained: Explained, via: str) -> dict[str, Any]:
        stem = self._stem(source)
        response = explained.response
        suffix = _SUFFIXES.get(response.image_format, f".{response.image_format}")
        explanations = []
        every = explained.explanations
        several = len(every) > len(explained.methods)  # several classes per method
        for maps in every:
            method = maps.method
            # One file per method; with several classes (or boxes), one per method and each.
            name = f"{stem}.{method}" + (_each(maps) if several else "")
            files: dict[str, str] = {}
            overlay = maps.map_fields()["overlay"]
            if overlay is not None:
                path = self.folder / f"{name}{suffix}"
                path.write_bytes(base64.b64decode(overlay))
                files["overlay"] = path.name
            raw = maps.raw
            if raw is not None:
                path = self.folder / f"{name}.npy"
                np.save(path, raw)
                files["raw"] = path.name
            scored = maps.faithfulness
            explained_what = {name: getattr(maps, name) for name in _TASK_FIELDS}
            entry = {
                "method": method,
                "class_idx": maps.class_idx,
                "label": maps.label,
                "probability": maps.probability,
                **{k: v for k, v in explained_what.items() if v is not None},
                **files,
                **({"faithfulness": scored} if scored else {}),
            }
            if maps.explanation.concepts is not None:
                entry["concepts"] = self._concepts(stem, method, suffix, maps)
            explanations.append(entry)
        line = {
            "file": source,
            "via": via,
            "model": response.model,
            "device": response.device,
            "predictions": [p.model_dump() for p in explained.predictions],
            "explanations": explanations,
            "timings": response.timings.model_dump(),
        }
        self._append(line)
        return line

    def _concepts(
        self, stem: str, method: str, suffix: str, maps: MethodMaps
    ) -> list[dict[str, Any]]:
        """DFF's concepts: each one's top labels, and its picture and raw map as files
        (``<image>.<method>.concept<k>.<ext>``) when they were asked for."""
        written = []
        for concept in maps.explanation.concepts or []:
            name = f"{stem}.{method}.concept{concept.index}"
            files: dict[str, str] = {}
            fields = concept.map.model_dump()
            if fields.get("overlay") is not None:
                path = self.folder / f"{name}{suffix}"
                path.write_bytes(base64.b64decode(fields["overlay"]))
                files["overlay"] = path.name
            if fields.get("raw") is not None:
                path = self.folder / f"{name}.npy"
                np.save(path, np.asarray(fields["raw"]["values"], dtype=np.float32))
                files["raw"] = path.name
            written.append(
                {
                    "index": concept.index,
                    "top_labels": [label.model_dump() for label in concept.top_labels],
                    **files,
                }
            )
        return written

    def write_error(self, source: str, code: str, message: str) -> None:
        with self._writing():
            self._append({"file": source, "error": {"code": code, "message": message}})

    def _append(self, line: dict[str, Any]) -> None:
        with self.results.open("a") as stream:
            stream.write(json.dumps(line) + "\n")
