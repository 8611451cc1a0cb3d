"""A detector's and a segmenter's OIP outputs built from the pipeline's answers, without a
model: their shapes, their per-image parameters and the refusal of masks that do not stack."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from app.errors import BadRequest
from app.pipeline.results import Detection, PredictResult, Segment
from app.protocols.oip_tasks import TASK_OUTPUT_NAMES, predicted_outputs
from app.protocols.tensors import OutputTensor


def detected(*boxes: tuple[float, float, float, float]) -> PredictResult:
    return PredictResult(
        filename="x.png",
        width=64,
        height=48,
        predictions=[],
        detections=[
            Detection(box=list(box), class_idx=k + 1, label=f"thing{k + 1}", score=0.9 - k / 10)
            for k, box in enumerate(boxes)
        ],
    )


def segmented(mask: np.ndarray) -> PredictResult:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return PredictResult(
        filename="x.png",
        width=mask.shape[1],
        height=mask.shape[0],
        predictions=[],
        segments=[
            Segment(class_idx=0, label="background", pixels=int(mask.size), box=[0, 0, 1, 1])
        ],
        mask=base64.b64encode(buffer.getvalue()).decode(),
    )


def test_detections_of_several_images_are_rows_with_their_counts() -> None:
    made = predicted_outputs(
        [detected((1, 2, 3, 4), (5, 6, 7, 8)), detected(), detected((0, 0, 9, 9))]
    )
    assert made["boxes"].shape == (3, 4)
    assert list(made["boxes"].values) == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 9, 9]
    assert made["scores"].shape == (3,) and made["scores"].values[0] == pytest.approx(0.9)
    assert made["labels"].values == [b"thing1", b"thing2", b"thing1"]
    assert made["labels"].parameters == {"class_idx": "1,2,1", "detections_per_image": "2,0,1"}
    assert made["boxes"].parameters == {"detections_per_image": "2,0,1"}
    assert set(made) == {"boxes", "scores", "labels"}


def test_one_image_without_detections_gives_empty_tensors() -> None:
    made = predicted_outputs([detected()])
    assert made["boxes"].shape == (0, 4) and made["boxes"].raw() == b""
    assert made["labels"].parameters == {"class_idx": ""}


def test_the_label_mask_comes_back_as_int32_classes() -> None:
    mask = np.zeros((3, 5), dtype=np.uint8)
    mask[1, 2:] = 7
    made = predicted_outputs([segmented(mask), segmented(mask[::-1])])
    tensor = made["mask"]
    assert (tensor.datatype, tensor.shape) == ("INT32", (2, 3, 5))
    stacked = np.frombuffer(tensor.raw(), dtype="<i4").reshape(2, 3, 5)
    np.testing.assert_array_equal(stacked, np.stack([mask, mask[::-1]]))
    assert tensor.json_data()[:10] == [0, 0, 0, 0, 0, 0, 0, 7, 7, 7]


def test_masks_of_different_sizes_are_refused() -> None:
    with pytest.raises(BadRequest, match="stacks one tensor per image.*3x5, 4x5"):
        predicted_outputs([segmented(np.zeros((3, 5))), segmented(np.zeros((4, 5)))])


def test_int32_tensors_in_both_forms() -> None:
    tensor = OutputTensor("mask", "INT32", (1, 3), [0, 7, -1])
    assert tensor.raw() == np.asarray([0, 7, -1], dtype="<i4").tobytes()
    assert tensor.json_data() == [0, 7, -1]


def test_every_task_output_names_its_task() -> None:
    assert TASK_OUTPUT_NAMES == {
        "boxes": "detection",
        "scores": "detection",
        "labels": "detection",
        "mask": "segmentation",
    }
