"""Hand-checkable cases for app.cam.localization."""

from __future__ import annotations

import pytest
import torch

from app.cam.localization import (
    best_iou,
    energy_pointing_game,
    iou_sweep,
    mask_iou,
    minmax_normalize,
    pointing_game,
    upsample_maps,
)


def _mask(h: int, w: int, pixels: list[tuple[int, int]]) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def test_minmax_normalize_and_constant_map() -> None:
    cams = torch.tensor([[[2.0, 4.0], [3.0, 6.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = minmax_normalize(cams)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))


def test_upsample_keeps_same_size_and_accepts_channel_dim() -> None:
    cams = torch.rand(3, 1, 4, 4)
    assert torch.equal(upsample_maps(cams, (4, 4)), cams[:, 0])
    assert upsample_maps(cams, (8, 8)).shape == (3, 8, 8)


def test_pointing_game_hit_and_miss_same_resolution() -> None:
    cam = torch.zeros(1, 4, 4)
    cam[0, 1, 2] = 1.0
    hit = _mask(4, 4, [(1, 2), (1, 3)])
    miss = _mask(4, 4, [(3, 0)])
    out = pointing_game(cam.expand(2, 4, 4), torch.stack([hit, miss]))
    assert out.dtype == torch.bool
    assert out.tolist() == [True, False]


def test_pointing_game_tolerance_is_euclidean_pixels() -> None:
    cam = torch.zeros(1, 5, 5)
    cam[0, 0, 0] = 1.0
    mask = _mask(5, 5, [(2, 0)])  # distance 2 from the peak
    diag = _mask(5, 5, [(1, 1)])  # distance sqrt(2)
    assert not pointing_game(cam, mask[None], tolerance=1).item()
    assert pointing_game(cam, mask[None], tolerance=2).item()
    assert not pointing_game(cam, diag[None], tolerance=1).item()
    assert pointing_game(cam, diag[None], tolerance=1.5).item()
    with pytest.raises(ValueError):
        pointing_game(cam, mask[None], tolerance=-1)


def test_pointing_game_upsamples_low_resolution_map() -> None:
    # 2x2 map, peak top-left; bilinear (align_corners=False) upsampling to 4x4 keeps the
    # unique maximum at pixel (0, 0) and the value decreases towards the other corners.
    cam = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert pointing_game(cam, _mask(4, 4, [(0, 0)])[None]).item()
    assert not pointing_game(cam, _mask(4, 4, [(3, 3)])[None]).item()


def test_pointing_game_ties_take_first_row_major() -> None:
    cam = torch.ones(1, 3, 3)
    assert pointing_game(cam, _mask(3, 3, [(0, 0)])[None]).item()
    assert not pointing_game(cam, _mask(3, 3, [(2, 2)])[None]).item()


def test_energy_pointing_game_by_hand() -> None:
    cams = torch.tensor(
        [
            [[3.0, 1.0], [0.0, 0.0]],  # 3 / 4 inside
            [[-1.0, 1.0], [1.0, 2.0]],  # negatives clipped: (1 + 2) / 4 inside
            [[0.0, 0.0], [0.0, 0.0]],  # zero map -> mask area fraction 1/4
        ]
    )
    masks = torch.stack(
        [_mask(2, 2, [(0, 0)]), _mask(2, 2, [(0, 0), (0, 1), (1, 1)]), _mask(2, 2, [(1, 1)])]
    )
    out = energy_pointing_game(cams, masks)
    assert torch.allclose(out, torch.tensor([0.75, 0.75, 0.25]))


def test_energy_pointing_game_uniform_upsampled_map_is_area_fraction() -> None:
    cams = torch.ones(1, 2, 2)
    mask = _mask(8, 8, [(y, x) for y in range(4) for x in range(8)])  # half the image
    assert torch.allclose(energy_pointing_game(cams, mask[None]), torch.tensor([0.5]))


def test_mask_iou_by_hand() -> None:
    cam = torch.tensor([[[1.0, 0.6], [0.2, 0.0]]])
    mask = _mask(2, 2, [(0, 0), (1, 0)])[None]
    # threshold 0.5 -> region {(0,0), (0,1)}; intersection 1, union 3
    assert torch.allclose(mask_iou(cam, mask), torch.tensor([1 / 3]))
    # threshold 0.1 -> {(0,0), (0,1), (1,0)}: 2 / 3 ; threshold 0.7 -> {(0,0)}: 1 / 2
    assert torch.allclose(mask_iou(cam, mask, threshold=0.1), torch.tensor([2 / 3]))
    sweep = iou_sweep(cam, mask, (0.1, 0.5, 0.7))
    assert sweep.shape == (1, 3)
    assert torch.allclose(sweep, torch.tensor([[2 / 3, 1 / 3, 1 / 2]]))


def test_mask_iou_normalises_before_thresholding() -> None:
    # Same ordering as above, shifted and scaled: identical IoU.
    cam = torch.tensor([[[1.0, 0.6], [0.2, 0.0]]]) * 7 + 3
    mask = _mask(2, 2, [(0, 0), (1, 0)])[None]
    assert torch.allclose(mask_iou(cam, mask), torch.tensor([1 / 3]))


def test_best_iou_batch_and_per_sample() -> None:
    cams = torch.tensor([[[1.0, 0.6], [0.2, 0.0]], [[1.0, 0.6], [0.2, 0.0]]])
    masks = torch.stack([_mask(2, 2, [(0, 0), (1, 0)]), _mask(2, 2, [(0, 0)])])
    ts = (0.1, 0.5, 0.7)
    # sample 0: [2/3, 1/3, 1/2]; sample 1: [1/3, 1/2, 1]
    best, t = best_iou(cams, masks, ts)
    means = torch.tensor([(2 / 3 + 1 / 3) / 2, (1 / 3 + 1 / 2) / 2, (1 / 2 + 1) / 2])
    assert torch.isclose(best, means.max())
    assert t.item() == pytest.approx(0.7)
    best_s, t_s = best_iou(cams, masks, ts, per_sample=True)
    assert torch.allclose(best_s, torch.tensor([2 / 3, 1.0]))
    assert torch.allclose(t_s, torch.tensor([0.1, 0.7]))


def test_shapes_are_validated() -> None:
    with pytest.raises(ValueError):
        mask_iou(torch.rand(2, 4, 4), torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        pointing_game(torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool))
