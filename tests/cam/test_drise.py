"""D-RISE against the paper's formula computed directly, one mask at a time, on a tiny
detector whose boxes and class probabilities follow the pixels."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from app.cam import DRISE, METHODS, ClassProbability, find_method
from app.cam.drise import masks_at, random_masks
from app.cam.task_targets import DetectionSimilarity

SIZE = 16


class BlobDetector(nn.Module):
    """One detection per image: the box around the pixels of channel 0 above 0.5, scored by
    their mean; ``probabilities`` (3 classes) follow the mean of channel 0 inside the box and of
    channel 1 (so a mask moves the box, the score and the vector)."""

    def __init__(self, probabilities: bool) -> None:
        super().__init__()
        self.probabilities = probabilities
        self.scale = nn.Parameter(torch.tensor(3.0), requires_grad=False)

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        found = []
        for image in x:
            bright = image[0] > 0.5
            if not bool(bright.any()):
                found.append(
                    {
                        "boxes": x.new_zeros((0, 4)),
                        "scores": x.new_zeros((0,)),
                        "labels": torch.zeros(0, dtype=torch.long),
                        **({"probabilities": x.new_zeros((0, 3))} if self.probabilities else {}),
                    }
                )
                continue
            rows = torch.nonzero(bright.any(1)).flatten()
            cols = torch.nonzero(bright.any(0)).flatten()
            box = torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()
            inside = image[0][bright].mean()
            logits = torch.stack([inside, image[1].mean(), inside.new_tensor(0.2)]) * self.scale
            probs = logits.softmax(0)
            one = {
                "boxes": box[None],
                "scores": probs.max()[None],
                "labels": probs.argmax()[None],
            }
            if self.probabilities:
                one["probabilities"] = probs[None]
            found.append(one)
        return found


def _image() -> Tensor:
    torch.manual_seed(1)
    x = torch.rand(2, SIZE, SIZE) * 0.4
    x[0, 4:10, 5:12] = 0.9 + 0.1 * torch.rand(6, 7)
    return x


def _direct(model: nn.Module, x: Tensor, target: Any, masks: int, seed: int) -> Tensor:
    """(1 / N) sum_i w_i M_i with w_i = max_j IoU x cos x O, by hand, one mask per forward."""
    generator = torch.Generator().manual_seed(seed)
    cells, shifts = random_masks(masks, 4, 0.5, (SIZE, SIZE), generator)
    total = torch.zeros(SIZE, SIZE)
    for i in range(masks):
        mask = masks_at(cells[i : i + 1], shifts[i : i + 1], (SIZE, SIZE))[0]
        out = model((x * mask)[None])[0]
        if out["boxes"].numel() == 0:
            continue
        b, t = out["boxes"], target.box
        ix = (torch.minimum(b[:, 2], t[2]) - torch.maximum(b[:, 0], t[0])).clamp(min=0)
        iy = (torch.minimum(b[:, 3], t[3]) - torch.maximum(b[:, 1], t[1])).clamp(min=0)
        inter = ix * iy
        union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
        iou = inter / union
        if "probabilities" in out:
            p, q = out["probabilities"], target.probabilities
            cos = (p @ q) / (p.norm(dim=1) * q.norm())
            objectness = torch.ones_like(cos)
        else:
            cos = (out["labels"] == target.label).float()
            objectness = out["scores"]
        total += (iou * cos * objectness).max() * mask
    return total / masks


@pytest.mark.parametrize("probabilities", [True, False], ids=["cosine", "one-hot"])
def test_drise_is_the_papers_weighted_sum(probabilities: bool) -> None:
    model = BlobDetector(probabilities).eval()
    x = _image()
    out = model(x[None])[0]
    target = DetectionSimilarity.of(out, 0)
    with DRISE(model, masks=40, grid=4, seed=7, batch_size=16) as drise:
        with torch.inference_mode():
            model(x[None])
        (cam,) = drise(targets=[target], normalized=False)
    expected = _direct(model, x, target, 40, 7)
    assert cam.shape == (1, SIZE, SIZE)
    assert torch.allclose(cam[0], expected, atol=1e-5)
    assert float(expected.max()) > 0  # some masks keep the box: the check is not 0 == 0
    assert drise.chunk_sizes == [16, 16, 8]


def test_the_map_does_not_depend_on_the_chunks_and_peaks_in_the_box() -> None:
    model = BlobDetector(True).eval()
    x = _image()
    target = DetectionSimilarity.of(model(x[None])[0], 0)
    maps = []
    for batch_size in (1, 64):
        with DRISE(model, masks=200, grid=4, seed=3, batch_size=batch_size) as drise:
            model(x[None])
            maps.append(drise(targets=[target])[0][0])
    assert torch.allclose(maps[0], maps[1], atol=1e-6)
    peak = int(maps[0].argmax())
    assert 4 <= peak // SIZE < 10 and 5 <= peak % SIZE < 12


def test_similarity_is_zero_without_a_match() -> None:
    target = DetectionSimilarity(torch.tensor([0.0, 0.0, 4.0, 4.0]), 1)
    far = {
        "boxes": torch.tensor([[8.0, 8.0, 12.0, 12.0], [0.0, 0.0, 4.0, 4.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 2]),
    }
    assert float(target(far)) == 0.0  # the first does not overlap, the second is another class
    far["labels"] = torch.tensor([1, 1])
    assert float(target(far)) == pytest.approx(0.8)
    far["objectness"] = torch.tensor([0.5, 0.25])
    assert float(target(far)) == pytest.approx(0.25)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    assert float(target(empty)) == 0.0


def test_drise_hooks_no_layer_and_prices_its_masks() -> None:
    assert find_method("drise") == ("DRISE", DRISE) and METHODS["DRISE"] is DRISE
    model = BlobDetector(False)
    with DRISE(model, target_layer="not.a.layer") as drise:
        assert drise.target_names == []
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert DRISE.extra_forwards([], {"masks": 300}, 2).total == 600
    assert DRISE.extra_forwards([(1, 512, 7, 7)], {}, 1).total == 1000
    assert "aug_smooth" not in DRISE.option_names and "eigen_smooth" not in DRISE.option_names


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"masks": 0}, "masks must be a positive int"),
        ({"grid": 1}, "grid must be an int >= 2"),
        ({"keep": 1.0}, "keep must lie strictly between 0 and 1"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        DRISE(BlobDetector(False), **options)


def test_with_a_class_index_masks_are_weighed_by_its_logit() -> None:
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2)).eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    with DRISE(classifier, masks=30, grid=4, seed=2, batch_size=8) as drise:
        classifier(x)
        (cam,) = drise(1, normalized=False)
    cells, shifts = random_masks(30, 4, 0.5, (SIZE, SIZE), torch.Generator().manual_seed(2))
    masks = masks_at(cells, shifts, (SIZE, SIZE))
    scores = classifier(x * masks[:, None])[:, 1]
    assert torch.allclose(cam[0], torch.relu((scores[:, None, None] * masks).mean(0)), atol=1e-5)


def test_rise_as_its_paper_has_it_weighs_masks_by_the_class_probability() -> None:
    # A class index weighs each mask by the class's logit, as every method reads class_idx; a
    # logit negative under every mask then leaves only negative weights and a blank map. RISE
    # weighs by the softmax probability: targets=ClassProbability(c).
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2)).eval()
    with torch.no_grad():
        classifier[1].bias[1] = -20.0
    x = torch.rand(1, 3, SIZE, SIZE)
    with DRISE(classifier, masks=30, grid=4, seed=2, batch_size=8) as drise:
        classifier(x)
        (by_logit,) = drise(1, normalized=False)
        (by_probability,) = drise(targets=ClassProbability(1), normalized=False)
    cells, shifts = random_masks(30, 4, 0.5, (SIZE, SIZE), torch.Generator().manual_seed(2))
    masks = masks_at(cells, shifts, (SIZE, SIZE))
    with torch.no_grad():
        probabilities = classifier(x * masks[:, None]).softmax(1)[:, 1]
    assert float(by_logit.abs().max()) == 0.0
    expected = torch.relu((probabilities[:, None, None] * masks).mean(0))
    assert float(expected.max()) > 0
    torch.testing.assert_close(by_probability[0], expected, rtol=1e-4, atol=1e-12)
