"""Segmentation: /predict answers the classes present (and ``output=mask``, the label mask);
/explain explains ``class_idx`` (or several: ``classes``, ``top_classes``) over ``region``:
``mask`` (the class's predicted mask, the default), ``box:x0,y0,x1,y1`` (upload pixels) or
``png:<base64>`` (an uploaded mask of the upload's size, non-zero inside), by the sum of the
class's logits there (``app.cam.task_targets.RegionScore``); its faithfulness curves follow the
class's mean probability there (``RegionProbability``, the answer's ``probability``)."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from app.cam.task_targets import RegionProbability, RegionScore
from app.errors import InvalidTarget
from app.models.loading import LoadedModel
from app.pipeline import checks
from app.pipeline.classes import check_choice, class_count
from app.pipeline.decoding import DecodedImage
from app.pipeline.results import Segment
from app.pipeline.tasks.base import ExplainParams, TaskPipeline, Wanted
from app.pipeline.tasks.common import Outline, Scale, label_png

MASK, BOX, PNG = "mask", "box:", "png:"
#: The most bytes of an uploaded region mask (base64 text).
MAX_REGION_BYTES = 8 * 1024 * 1024


def upload_labels(decoded: DecodedImage, output: torch.Tensor) -> np.ndarray:
    """The predicted class of every pixel of the upload: (H, W) at the upload's size."""
    labels = output.detach().argmax(0).to(torch.int32).cpu().numpy()
    width, height = decoded.original_size
    if labels.shape == (height, width):
        return labels
    picture = Image.fromarray(labels, mode="I").resize((width, height), Image.Resampling.NEAREST)
    resized: np.ndarray = np.array(picture)  # writable: torch.from_numpy takes it
    return resized


def segments(model: LoadedModel, labels: np.ndarray) -> list[Segment]:
    counts = np.bincount(labels.ravel(), minlength=model.spec.num_classes)
    found = []
    for class_idx in np.argsort(-counts, kind="stable"):
        pixels = int(counts[class_idx])
        if pixels == 0:
            break
        rows = np.flatnonzero((labels == class_idx).any(axis=1))
        cols = np.flatnonzero((labels == class_idx).any(axis=0))
        found.append(
            Segment(
                class_idx=int(class_idx),
                label=model.labels[int(class_idx)],
                pixels=pixels,
                box=[int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1],
            )
        )
    return found


def read_region(text: str | None) -> str:
    """The region's kind, checked for form (its fit to the image is checked per image)."""
    region = (text or MASK).strip()
    if region == MASK:
        return MASK
    if region.startswith(BOX):
        _box_numbers(region)
        return region
    if region.startswith(PNG):
        if len(region) > MAX_REGION_BYTES:
            raise InvalidTarget(
                f"region's mask has {len(region)} bytes; at most {MAX_REGION_BYTES} are read.",
                details={"parameter": "region"},
            )
        return region
    raise InvalidTarget(
        f"region must be 'mask', 'box:x0,y0,x1,y1' or 'png:<base64 PNG>', got {region[:40]!r}.",
        details={"parameter": "region"},
    )


def _box_numbers(region: str) -> list[float]:
    parts = region[len(BOX) :].split(",")
    try:
        numbers = [float(p) for p in parts if p.strip().isascii()]
    except ValueError:
        numbers = []
    if len(numbers) != 4 or len(parts) != 4 or not all(np.isfinite(numbers)):
        raise InvalidTarget(
            f"region box must be box:x0,y0,x1,y1 (four numbers, upload pixels), got "
            f"{region[:60]!r}.",
            details={"parameter": "region"},
        )
    return numbers


def region_mask(
    region: str, decoded: DecodedImage, labels: np.ndarray, class_idx: int
) -> np.ndarray:
    """``region`` as (H, W) booleans at the upload's size; InvalidTarget when it does not fit."""
    width, height = decoded.original_size
    name = decoded.filename or "the image"
    if region == MASK:
        mask: np.ndarray = np.asarray(labels == class_idx)
        if not mask.any():
            raise InvalidTarget(
                f"class {class_idx} is predicted nowhere in {name}, so its mask is empty; pick a "
                "class of the image's segments or send region=box:x0,y0,x1,y1.",
                details={"parameter": "region"},
            )
        return mask
    if region.startswith(BOX):
        x0, y0, x1, y1 = _box_numbers(region)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InvalidTarget(
                f"region box {region[len(BOX) :][:60]} is not inside {name} ({width}x{height}): "
                f"it needs 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}.",
                details={"parameter": "region"},
            )
        mask = np.zeros((height, width), dtype=bool)
        mask[int(y0) : max(int(y0) + 1, round(y1)), int(x0) : max(int(x0) + 1, round(x1))] = True
        return mask
    unreadable = InvalidTarget(
        "region png:... must hold a base64 PNG (or other image) of the upload's size.",
        details={"parameter": "region"},
    )
    try:
        data = base64.b64decode(region[len(PNG) :], validate=True)
        picture = Image.open(io.BytesIO(data))  # the header only: the size is checked first
    except Image.DecompressionBombError:
        raise InvalidTarget(
            f"region mask declares far more pixels than {name} ({width}x{height}) has; send a "
            "mask of the upload's size.",
            details={"parameter": "region"},
        ) from None
    except (binascii.Error, ValueError, OSError):
        raise unreadable from None
    if picture.size != (width, height):
        raise InvalidTarget(
            f"region mask is {picture.width}x{picture.height} but {name} is {width}x{height}; "
            "send a mask of the upload's size.",
            details={"parameter": "region"},
        )
    try:  # a mask of the upload's size: no more pixels than the upload, which was checked
        picture.load()
    except (ValueError, OSError):
        raise unreadable from None
    mask = np.asarray(picture.convert("L")) > 0
    if not mask.any():
        raise InvalidTarget("region mask is empty (all zero).", details={"parameter": "region"})
    return mask


def _to_output(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An upload-sized mask at the model output's (h, w)."""
    height, width = size
    if mask.shape == (height, width):
        return torch.from_numpy(mask)
    picture = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR)) >= 128
    if not resized.any():  # a region thinner than one output pixel: its nearest pixel
        resized = np.asarray(picture.resize((width, height), Image.Resampling.BOX)) > 0
    return torch.from_numpy(resized)


def explained_classes(params: ExplainParams, index: int, found: Sequence[Segment]) -> list[int]:
    """The classes image ``index`` explains, in the answer's order: ``classes`` as listed;
    ``top_classes=K`` the K largest classes present other than the background (class 0), fewer
    when fewer are present; ``class_idx`` (one for all images or one per image); by default the
    largest class other than the background. With nothing but the background, the background."""
    others = [s.class_idx for s in found if s.class_idx != 0] or [s.class_idx for s in found]
    if params.classes:
        return list(params.classes)
    if params.top_classes:
        return others[: params.top_classes]
    if params.class_idx:
        return [params.class_idx[index if len(params.class_idx) > 1 else 0]]
    return others[:1]


class SegmentationPipeline(TaskPipeline):
    task: ClassVar[str] = "segmentation"
    own_parameters: ClassVar[tuple[str, ...]] = ("region", "classes", "top_classes")
    picked_by: ClassVar[str] = "class_idx, classes or top_classes with region"
    predict_outputs: ClassVar[tuple[str, ...]] = ("mask",)

    def answer(
        self, model: LoadedModel, decoded: DecodedImage, output: Any, outputs: Sequence[str]
    ) -> dict[str, Any]:
        labels = upload_labels(decoded, output)
        answer: dict[str, Any] = {"segments": segments(model, labels)}
        if "mask" in outputs:
            answer["mask"] = label_png(torch.from_numpy(labels), decoded.original_size)
        return answer

    def check_params(self, model: LoadedModel, params: ExplainParams, images: int) -> int:
        if params.boxes:
            raise InvalidTarget(
                "box is for detection models; a segmenter explains a class over a region: send "
                "class_idx and region.",
                details={"parameter": "box"},
            )
        checks.check_classes(model, params.class_idx, images)
        check_choice(params, model.spec.name, model.spec.num_classes)
        read_region(params.region)
        return class_count(params)

    def wanted(
        self,
        model: LoadedModel,
        decoded: DecodedImage,
        index: int,
        output: Any,
        params: ExplainParams,
    ) -> tuple[dict[str, Any], list[Wanted]]:
        labels = upload_labels(decoded, output)
        found = segments(model, labels)
        region = read_region(params.region)
        classes = explained_classes(params, index, found)
        # A box or an uploaded mask is every class's region: read (a PNG decoded) once.
        shared = None if region == MASK else region_mask(region, decoded, labels, classes[0])
        wanted = [
            self._wanted_class(
                model,
                output,
                region,
                class_idx,
                region_mask(region, decoded, labels, class_idx) if shared is None else shared,
            )
            for class_idx in classes
        ]
        return {"segments": found}, wanted

    def _wanted_class(
        self,
        model: LoadedModel,
        output: torch.Tensor,
        region: str,
        class_idx: int,
        mask: np.ndarray,
    ) -> Wanted:
        """Class ``class_idx`` over ``mask`` (the region, at the upload's size) of one image:
        its target, scores and fields."""
        out_mask = _to_output(mask, (int(output.shape[-2]), int(output.shape[-1])))
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        bounds = [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
        logits = output.detach().float()
        inside = out_mask.to(logits.device)
        area = max(1, int(inside.sum()))
        mean_logit = float((logits[class_idx] * inside).sum() / area)
        judged_by = RegionProbability(class_idx, out_mask)
        probability = float(judged_by(logits))
        label = model.labels[class_idx]
        target = RegionScore(class_idx, out_mask)
        return Wanted(
            lambda _plan: target,
            {
                "class_idx": class_idx,
                "label": label,
                "logit": round(mean_logit, 6),
                "probability": round(probability, 6),
                "box": bounds,
                "region": MASK if region == MASK else region.split(":")[0],
            },
            judged_by,
            [Outline(bounds, f"{label} {probability:.2f}")],
        )


__all__ = ["SegmentationPipeline", "Scale"]
