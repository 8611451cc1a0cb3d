"""camserve's CAM maps against the peer libraries', map by map.

    python bench/peer_agreement.py --peers /tmp/peers            # ~5 minutes on the 2-core box
    python bench/peer_agreement.py --peers /tmp/peers --quick    # one image, resnet18 only

For every method that camserve and a peer both implement, the same random-weight torchvision
model (``torch.manual_seed(0)``, eval mode), the same seeded 224x224 inputs, the same target
layer (``layer4``) and the same class (the model's top class for the image) go through both, and
the bench prints per method: the max and mean absolute difference of the normalised maps, their
Pearson and Spearman correlations, and whether they agree to 1e-5 and to 1e-3 (max abs
difference). Writes ``bench/results/peer_agreement_cpu.json`` (``--out``).

Peers: pytorch-grad-cam (``pytorch_grad_cam``) and TorchCAM (``torchcam``). They are not
dependencies of camserve: install them outside the project's venv, e.g.
``pip install --target /tmp/peers --no-deps grad-cam torchcam ttach`` plus what they import that
the venv lacks (opencv-python-headless, scikit-learn, scipy, matplotlib, ...), and pass
``--peers /tmp/peers``. Without them the bench says what it skipped and why, and exits 0.

What is compared (the peers' post-processing differs, so that resizing and scaling do not count
as disagreement):

- ``layer``: the raw map at the target layer's resolution (7x7 at 224x224), before any resize,
  from each side: camserve ``normalized=False`` (the ReLU'd weighted sum); TorchCAM
  ``normalized=False``; pytorch-grad-cam: the output of its ``get_cam_image`` (captured before its
  ReLU, min-max and OpenCV resize to the input). Both are then put through one normaliser:
  ReLU, then min-max per map in float64 (a flat map is all zeros).
- ``input``: methods whose map is at the input's resolution by definition (FullGrad, Guided
  Backpropagation): each side's map at 224x224, then the same normaliser.

The Score-CAM family (ScoreCAM, ISCAM) runs on resnet18's ``layer4`` with 112x112 inputs
(``--score-size``): one forward per channel on both sides, 512 x 2 per image. Methods that draw
random numbers (SmoothGradCAMpp, SSCAM, RandomCAM) are skipped: the peers draw from the global
torch/numpy generators in their own order and batch shapes, so the same seed does not give the
same noise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import models

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars

import app.cam as cam  # noqa: E402

LAYER = "layer4"
Maps = Callable[[torch.nn.Module, torch.Tensor, int], np.ndarray]

# Why a method pair differs beyond 1e-3, once measured and traced to its cause (see
# docs/benchmarks.md, "Agreement with the peers"). Keyed by (method, peer).
REASONS: dict[tuple[str, str], str] = {
    ("GradCAMpp", "pytorch-grad-cam"): (
        "epsilon: the peer adds 1e-6 to eq. 19's denominator 2g^2 + sum_ab A_ab g^3; with "
        "random weights g^2 is of that order, so alpha moves (camserve: the exact 1/(2 + g "
        "sum_ab A_ab), no epsilon); with the peer's 1e-6 camserve agrees to 1e-6 (check row)"
    ),
    ("GradCAMpp", "torchcam"): (
        "peer bug: TorchCAM 0.5.0 computes alpha in place on a copy (alpha[idx][mask].div_: "
        "boolean indexing copies), so its alpha stays g^2 and w_k = sum g^2 ReLU(g); with that "
        "alpha camserve agrees exactly (check row). Its denominator would also sum A_ab g_ab^3 "
        "over positions, not g_ij^3 sum_ab A_ab as eq. 19 has"
    ),
    ("KPCACAM", "pytorch-grad-cam"): (
        "definitional: the peer's default kernel is 'sigmoid' (camserve: the RBF kernel, "
        "gamma 1/K) and it leaves KernelPCA's arbitrary sign (camserve signs it like Eigen-CAM); "
        "with kernel='rbf' and the sign aligned the maps agree to 1e-6 (check row)"
    ),
    ("FEM", "pytorch-grad-cam"): (
        "peer deviates from the paper: it weighs each activation map A_k by the share of its "
        "positions above mu_k + k sigma_k; FEM (Fuad et al. 2020) weighs the binary map "
        "1[A_k >= mu_k + k sigma_k] by the channel mean mu_k, as camserve does; camserve made "
        "to use the peer's weighting agrees to 1e-6 (check row)"
    ),
    ("FinerCAM", "pytorch-grad-cam"): (
        "definitional: the peer's objective is sum_d p_d (y_c - a y_d) / sum_d p_d, p the softmax "
        "probabilities, differentiated through p; camserve (and TorchCAM, which agrees exactly) "
        "use y_c - gamma mean_d y_d, the paper's y_c - gamma y_d averaged over the references; "
        "camserve's GradCAM on the peer's target agrees to 1e-6 (check row)"
    ),
    ("FullGrad", "pytorch-grad-cam"): (
        "definitional: psi's min-max; the peer scales every channel of every term on its own "
        "(scale_accross_batch_and_channels), camserve scales each term per sample over all its "
        "channels and positions, as the FullGrad authors' post-processing does; camserve with "
        "a per-channel min-max agrees to 3e-6 (check row), so OpenCV's resize is not a cause"
    ),
    ("ScoreCAM", "pytorch-grad-cam"): (
        "definitional: the peer upsamples the masks with UpsamplingBilinear2d "
        "(align_corners=True); camserve and the authors' code use align_corners=False; camserve "
        "with the peer's upsampling agrees to 1e-6 (check row)"
    ),
    ("ScoreCAM", "torchcam"): (
        "definitional: TorchCAM min-max normalises each activation map at the layer's "
        "resolution and then upsamples; the paper (Algorithm 1) and camserve upsample, then "
        "normalise; camserve made to normalise first agrees to 1e-6 (check row)"
    ),
    ("ISCAM", "torchcam"): "definitional: the same mask order as ScoreCAM (check row)",
}


def normalise(maps: np.ndarray) -> np.ndarray:
    """ReLU then min-max per map, float64; a flat map becomes zeros."""
    flat = np.maximum(maps.astype(np.float64), 0.0).reshape(maps.shape[0], -1)
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    out = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0), 0.0)
    return out.reshape(maps.shape)


def rank(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    # average the ranks of ties (flat regions of ReLU'd maps are common)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if len(uniq) < len(values):
        sums = np.zeros(len(uniq))
        np.add.at(sums, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else None


def fmt(value: float | None) -> str:
    return "   n/a  " if value is None else f"{value:.6f}"


def compare(ours: np.ndarray, peer: np.ndarray) -> dict[str, Any]:
    if ours.shape != peer.shape:
        raise ValueError(f"shapes differ: camserve {ours.shape}, peer {peer.shape}")
    a, b = normalise(ours), normalise(peer)
    diff = np.abs(a - b)
    pear = [pearson(x.ravel(), y.ravel()) for x, y in zip(a, b, strict=True)]
    spear = [pearson(rank(x.ravel()), rank(y.ravel())) for x, y in zip(a, b, strict=True)]
    pear_v = [p for p in pear if p is not None]
    spear_v = [p for p in spear if p is not None]
    max_abs = float(diff.max())
    return {
        "shape": list(a.shape[1:]),
        "max_abs": max_abs,
        "mean_abs": float(diff.mean()),
        "pearson_min": min(pear_v) if pear_v else None,
        "spearman_min": min(spear_v) if spear_v else None,
        "agree_1e-5": max_abs <= 1e-5,
        "agree_1e-3": max_abs <= 1e-3,
        "per_image_max_abs": [float(d.max()) for d in diff],
    }


# --- camserve ---------------------------------------------------------------------------------


def ours_layer(cls: type, **kwargs: Any) -> Maps:
    def run(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
        with cls(model, LAYER, input_shape=tuple(x.shape[1:]), **kwargs) as ex:
            scores = model(x)
            (m,) = ex(c, scores, normalized=False)
        return m.detach().numpy()

    return run


def ours_input(cls: type, **kwargs: Any) -> Maps:
    def run(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
        with cls(model, **kwargs) as ex:
            scores = model(x)
            maps = ex(c, scores, normalized=False)
        return maps[0].detach().numpy()

    return run


def ours_finer(**kwargs: Any) -> Maps:
    def run(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
        with cam.FinerCAM(model, LAYER, **kwargs) as ex:
            scores = model(x)
            (m,) = ex(c, scores, normalized=False)
        return m.detach().numpy()

    return run


# --- pytorch-grad-cam -------------------------------------------------------------------------


def pgc_layer(name: str, **attrs: Any) -> Maps:
    """A pytorch-grad-cam method's raw map at the layer's resolution: its ``get_cam_image``."""

    def run(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
        pgc = importlib.import_module("pytorch_grad_cam")
        targets_mod = importlib.import_module("pytorch_grad_cam.utils.model_targets")
        method = getattr(pgc, name)(model, [dict(model.named_modules())[LAYER]])
        for key, value in attrs.items():
            setattr(method, key, value)
        captured: list[np.ndarray] = []
        inner = method.get_cam_image

        def capture(*args: Any, **kwargs: Any) -> np.ndarray:
            out = inner(*args, **kwargs)
            captured.append(np.asarray(out.detach() if isinstance(out, torch.Tensor) else out))
            return out

        method.get_cam_image = capture
        try:
            method(input_tensor=x, targets=[targets_mod.ClassifierOutputTarget(c)])
        finally:
            method.activations_and_grads.release()
        (raw,) = captured
        return raw

    return run


def pgc_fullgrad(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    pgc = importlib.import_module("pytorch_grad_cam")
    targets_mod = importlib.import_module("pytorch_grad_cam.utils.model_targets")
    method = pgc.FullGrad(model, [])
    try:
        return np.asarray(method(input_tensor=x, targets=[targets_mod.ClassifierOutputTarget(c)]))
    finally:
        method.activations_and_grads.release()


def pgc_guided(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    pgc = importlib.import_module("pytorch_grad_cam")
    gb = pgc.GuidedBackpropReLUModel(model, device=torch.device("cpu"))
    grad = gb(x.clone(), target_category=c)  # (H, W, 3), the input gradient
    return np.abs(grad).max(axis=2)[None]


def pgc_finer(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    """pytorch-grad-cam's FinerCAM explains its own ``target_idx`` (the closest classes by
    |y_d - y_c|, the first of which is c itself: it skips index 0)."""
    pgc = importlib.import_module("pytorch_grad_cam")
    method = pgc.FinerCAM(model, [dict(model.named_modules())[LAYER]])
    captured: list[np.ndarray] = []
    inner = method.base_cam.get_cam_image

    def capture(*args: Any, **kwargs: Any) -> np.ndarray:
        out = inner(*args, **kwargs)
        captured.append(np.asarray(out))
        return out

    method.base_cam.get_cam_image = capture
    try:
        method(x, alpha=0.6, target_idx=c)
    finally:
        method.base_cam.activations_and_grads.release()
    return captured[0]


# --- TorchCAM ---------------------------------------------------------------------------------


def tc_layer(name: str, **kwargs: Any) -> Maps:
    def run(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
        methods = importlib.import_module("torchcam.methods")
        with getattr(methods, name)(model, LAYER, input_shape=tuple(x.shape[1:]), **kwargs) as ex:
            scores = model(x)
            (m,) = ex(c, scores, normalized=False)
        return m.detach().numpy()

    return run


def tc_finer(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    methods = importlib.import_module("torchcam.methods")
    with methods.FinerCAM(model, LAYER, gamma=0.6, num_references=3) as ex:
        scores = model(x)
        (m,) = ex(c, scores, normalized=False)
    return m.detach().numpy()


# --- cause checks: camserve's extractors made to do what the peer does --------------------------
# Each names one definitional difference; when the check agrees to 1e-5, that difference is the
# whole disagreement. They subclass camserve's classes here, in the bench; the engine is not
# changed.


class GradCAMppEps(cam.GradCAMpp):
    """pytorch-grad-cam's Grad-CAM++: eq. 19 with 1e-6 added to the denominator g^2-scaled form,
    alpha = g^2 / (2 g^2 + sum_ab A_ab g^3 + 1e-6)."""

    def _weights_from(self, grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, grad.ndim))
        g2 = grad.pow(2)
        alpha = g2 / (2 * g2 + activation.sum(dim=dims, keepdim=True) * g2 * grad + 1e-6)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        return (alpha * torch.relu(grad)).sum(dim=dims)


class GradCAMppUndivided(cam.GradCAMpp):
    """TorchCAM 0.5.0's Grad-CAM++ as it runs: ``alpha[idx][mask].div_(...)`` divides a copy
    (boolean indexing copies), so alpha stays g^2 and w_k = sum_ij g^2 ReLU(g)."""

    def _weights_from(self, grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, grad.ndim))
        return (grad.pow(2) * torch.relu(grad)).sum(dim=dims)


class FEMPeer(cam.FEM):
    """pytorch-grad-cam's FEM: sum_k mean_ij(1[A_k > mu_k + k sigma_k]) * A_k (the share of
    positions above the threshold weighs the activation), not the paper's sum_k mu_k * B_k."""

    def _maps(self, objective: Any, scores: Any, retain_graph: bool, activations: Any) -> Any:
        out = []
        for a in activations:
            dims = tuple(range(2, a.ndim))
            mean = a.mean(dim=dims, keepdim=True)
            std = a.std(dim=dims, keepdim=True, correction=0)
            share = (a > mean + self.k_std * std).to(a.dtype).mean(dim=dims, keepdim=True)
            out.append(torch.relu((share * a).sum(dim=1)))
        return out


class ScoreCAMNormFirst(cam.ScoreCAM):
    """TorchCAM's masks: min-max at the layer's resolution, then upsampled (the paper and
    camserve upsample first, then min-max)."""

    def _masks(self, activation_maps: torch.Tensor, size: Any) -> torch.Tensor:
        return cam.resize_maps(cam.normalize_maps(activation_maps.float()), size)


class ISCAMNormFirst(cam.ISCAM):
    _masks = ScoreCAMNormFirst._masks


class ScoreCAMAlignCorners(cam.ScoreCAM):
    """pytorch-grad-cam's masks: ``UpsamplingBilinear2d`` (align_corners=True), then min-max."""

    def _masks(self, activation_maps: torch.Tensor, size: Any) -> torch.Tensor:
        up = torch.nn.functional.interpolate(
            activation_maps.float().unsqueeze(1),
            size=tuple(size),
            mode="bilinear",
            align_corners=True,
        )[:, 0]
        return cam.normalize_maps(up)


def ours_fullgrad_per_channel(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    """camserve's FullGrad with psi's min-max taken per channel, as the peer's
    ``scale_accross_batch_and_channels`` does (camserve: per sample, over every channel)."""
    fullgrad = importlib.import_module("app.cam.fullgrad")
    per_sample = fullgrad.rescale

    def per_channel(terms: torch.Tensor) -> torch.Tensor:
        n, k = terms.shape[:2]
        return per_sample(terms.reshape(n * k, 1, *terms.shape[2:])).reshape(terms.shape)

    fullgrad.rescale = per_channel
    try:
        return ours_input(cam.FullGrad)(model, x, c)
    finally:
        fullgrad.rescale = per_sample


def ours_finer_weighted(model: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    """camserve's GradCAM on pytorch-grad-cam's FinerCAM objective (its FinerWeightedTarget,
    passed as ``targets=``): the softmax-weighted mean of the references, differentiated
    through the weights."""
    targets_mod = importlib.import_module("pytorch_grad_cam.utils.model_targets")
    with cam.GradCAM(model, LAYER) as ex:
        scores = model(x)
        refs = (scores[0] - scores[0, c]).abs().argsort()[1:4].tolist()
        target = targets_mod.FinerWeightedTarget(c, refs, 0.6)
        (m,) = ex(targets=[target], scores=scores, normalized=False)
    return m.detach().numpy()


# --- the cases --------------------------------------------------------------------------------

SCORE = "score"  # runs on resnet18 at --score-size
CASES: list[dict[str, Any]] = [
    # method, peer, ours, theirs, resolution, family
    {"method": "CAM", "peer": "torchcam", "ours": ours_layer(cam.CAM), "theirs": tc_layer("CAM")},
    *[
        {
            "method": m,
            "peer": "pytorch-grad-cam",
            "ours": ours_layer(getattr(cam, m)),
            "theirs": pgc_layer(p),
        }
        for m, p in [
            ("GradCAM", "GradCAM"),
            ("HiResCAM", "HiResCAM"),
            ("GradCAMElementWise", "GradCAMElementWise"),
            ("GradCAMpp", "GradCAMPlusPlus"),
            ("XGradCAM", "XGradCAM"),
            ("LayerCAM", "LayerCAM"),
            ("EigenCAM", "EigenCAM"),
            ("EigenGradCAM", "EigenGradCAM"),
            ("KPCACAM", "KPCA_CAM"),
            ("FEM", "FEM"),
            ("ShapleyCAM", "ShapleyCAM"),
        ]
    ],
    {
        "method": "AblationCAM",
        "peer": "pytorch-grad-cam",
        "ours": ours_layer(cam.AblationCAM),
        "theirs": pgc_layer("AblationCAM", batch_size=64),
        "family": SCORE,
    },
    *[
        {
            "method": m,
            "peer": "torchcam",
            "ours": ours_layer(getattr(cam, m)),
            "theirs": tc_layer(p),
        }
        for m, p in [
            ("GradCAM", "GradCAM"),
            ("GradCAMpp", "GradCAMpp"),
            ("XGradCAM", "XGradCAM"),
            ("LayerCAM", "LayerCAM"),
        ]
    ],
    {"method": "FinerCAM", "peer": "torchcam", "ours": ours_finer(), "theirs": tc_finer},
    {"method": "FinerCAM", "peer": "pytorch-grad-cam", "ours": ours_finer(), "theirs": pgc_finer},
    {
        "method": "FullGrad",
        "peer": "pytorch-grad-cam",
        "ours": ours_input(cam.FullGrad),
        "theirs": pgc_fullgrad,
        "resolution": "input",
    },
    {
        "method": "GuidedBackprop",
        "peer": "pytorch-grad-cam",
        "ours": ours_input(cam.GuidedBackprop, target_layer=LAYER),
        "theirs": pgc_guided,
        "resolution": "input",
    },
    {
        "method": "ScoreCAM",
        "peer": "pytorch-grad-cam",
        "ours": ours_layer(cam.ScoreCAM),
        "theirs": pgc_layer("ScoreCAM", batch_size=64),
        "family": SCORE,
    },
    {
        "method": "ScoreCAM",
        "peer": "torchcam",
        "ours": ours_layer(cam.ScoreCAM),
        "theirs": tc_layer("ScoreCAM", batch_size=64),
        "family": SCORE,
    },
    {
        "method": "ISCAM",
        "peer": "torchcam",
        "ours": ours_layer(cam.ISCAM, num_samples=2),
        "theirs": tc_layer("ISCAM", batch_size=64, num_samples=2),
        "family": SCORE,
    },
]

CHECKS: list[dict[str, Any]] = [
    {
        "method": "GradCAMpp",
        "peer": "pytorch-grad-cam",
        "ours": ours_layer(GradCAMppEps),
        "theirs": pgc_layer("GradCAMPlusPlus"),
        "check": "camserve with the peer's eps=1e-6",
    },
    {
        "method": "GradCAMpp",
        "peer": "torchcam",
        "ours": ours_layer(GradCAMppUndivided),
        "theirs": tc_layer("GradCAMpp"),
        "check": "camserve with alpha = g^2 (the peer's division lost on a copy)",
    },
    {
        "method": "KPCACAM",
        "peer": "pytorch-grad-cam",
        "ours": ours_layer(cam.KPCACAM),
        "theirs": pgc_layer("KPCA_CAM", kernel="rbf"),
        "check": "the peer with kernel='rbf' "
        "(its default is 'sigmoid'), its arbitrary sign aligned with camserve's",
        "signed": True,
    },
    {
        "method": "FEM",
        "peer": "pytorch-grad-cam",
        "ours": ours_layer(FEMPeer),
        "theirs": pgc_layer("FEM"),
        "check": "camserve with the peer's weighting",
    },
    {
        "method": "FinerCAM",
        "peer": "pytorch-grad-cam",
        "ours": ours_finer_weighted,
        "theirs": pgc_finer,
        "check": "camserve's GradCAM on the peer's FinerWeightedTarget",
    },
    {
        "method": "FullGrad",
        "peer": "pytorch-grad-cam",
        "ours": ours_fullgrad_per_channel,
        "theirs": pgc_fullgrad,
        "resolution": "input",
        "check": "camserve with psi's min-max per channel, as the peer does",
    },
    {
        "method": "ScoreCAM",
        "peer": "pytorch-grad-cam",
        "ours": ours_layer(ScoreCAMAlignCorners),
        "theirs": pgc_layer("ScoreCAM", batch_size=64),
        "family": SCORE,
        "check": "camserve with the peer's align_corners=True upsampling",
    },
    {
        "method": "ScoreCAM",
        "peer": "torchcam",
        "ours": ours_layer(ScoreCAMNormFirst),
        "theirs": tc_layer("ScoreCAM", batch_size=64),
        "family": SCORE,
        "check": "camserve with the peer's normalise-then-upsample masks",
    },
    {
        "method": "ISCAM",
        "peer": "torchcam",
        "ours": ours_layer(ISCAMNormFirst, num_samples=2),
        "theirs": tc_layer("ISCAM", batch_size=64, num_samples=2),
        "family": SCORE,
        "check": "camserve with the peer's normalise-then-upsample masks",
    },
]

SKIPPED = [
    {
        "method": "SmoothGradCAMpp",
        "peer": "torchcam",
        "reason": "random: TorchCAM draws its noise from the global torch generator, one "
        "Normal.sample per noisy input; camserve from its own seeded generator in "
        "batches, so no seed gives both the same noise",
    },
    {
        "method": "SSCAM",
        "peer": "torchcam",
        "reason": "random: the same as SmoothGradCAMpp (noise on each channel's mask)",
    },
    {
        "method": "RandomCAM",
        "peer": "pytorch-grad-cam",
        "reason": "random by definition: numpy's global generator there, a torch generator here",
    },
]


def load_peers(folder: str | None) -> dict[str, str]:
    """The peers importable (after adding ``folder`` to sys.path): name -> version."""
    if folder:
        sys.path.append(folder)  # after the venv's own packages: the venv's torch wins
    found: dict[str, str] = {}
    for label, module, dist in [
        ("pytorch-grad-cam", "pytorch_grad_cam", "grad-cam"),
        ("torchcam", "torchcam", "torchcam"),
    ]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # not installed, or a missing dependency of it
            print(f"{label}: not importable ({type(exc).__name__}: {exc})")
            continue
        try:
            from importlib.metadata import PathDistribution

            metas = list(Path(folder or ".").glob(f"{dist.replace('-', '_')}-*.dist-info"))
            version = PathDistribution(metas[0]).version if metas else None
        except Exception:
            version = None
        if version is None:
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as dist_version

            try:
                version = dist_version(dist)
            except PackageNotFoundError:
                version = getattr(sys.modules[module], "__version__", "unknown")
        found[label] = version
    try:  # the peers' progress bars (tqdm before 4.66 ignores TQDM_DISABLE)
        from functools import partialmethod

        import tqdm

        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]
    except ImportError:
        pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", help="a folder holding the peer libraries (pip --target)")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--score-size", type=int, default=112)
    parser.add_argument("--score-images", type=int, default=2)
    parser.add_argument("--methods", help="only these methods (comma-separated)")
    parser.add_argument("--no-checks", action="store_true", help="leave out the cause checks")
    parser.add_argument("--quick", action="store_true", help="one image, resnet18 only")
    parser.add_argument("--out", default=str(REPO / "bench/results/peer_agreement_cpu.json"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.images = "resnet18", 1

    peers = load_peers(args.peers)
    if not peers:
        print(
            "peer_agreement: skipped: neither pytorch-grad-cam nor TorchCAM is importable "
            "(install them outside the venv, e.g. pip install --target /tmp/peers --no-deps "
            "grad-cam torchcam ttach, and pass --peers /tmp/peers)"
        )
        return 0
    wanted = set(args.methods.split(",")) if args.methods else None

    rows: list[dict[str, Any]] = []
    skipped = [dict(s) for s in SKIPPED]
    cases = CASES + ([] if args.no_checks else CHECKS)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(models, name)(weights=None).eval()
        for case in cases:
            method, peer = case["method"], case["peer"]
            if wanted and method not in wanted:
                continue
            family = case.get("family")
            if family == SCORE and name != "resnet18":
                continue
            if peer not in peers:
                skipped.append(
                    {"method": method, "peer": peer, "model": name, "reason": "peer not installed"}
                )
                continue
            size = args.score_size if family == SCORE else args.size
            images = min(args.images, args.score_images) if family == SCORE else args.images
            if family == SCORE and case.get("check"):
                images = 1  # a cause check of the slow family: one image is enough
            ours_maps, their_maps, classes = [], [], []
            started = time.perf_counter()
            try:
                for i in range(images):
                    gen = torch.Generator().manual_seed(1000 + i)
                    x = torch.randn(1, 3, size, size, generator=gen)
                    with torch.no_grad():
                        c = int(model(x).argmax(1))
                    classes.append(c)
                    ours = case["ours"](model, x, c)
                    theirs = case["theirs"](model, x, c)
                    if case.get("signed") and pearson(ours.ravel(), theirs.ravel()) is not None:
                        if pearson(ours.ravel(), theirs.ravel()) < 0:  # type: ignore[operator]
                            theirs = -theirs
                    ours_maps.append(ours)
                    their_maps.append(theirs)
                result = compare(np.concatenate(ours_maps), np.concatenate(their_maps))
            except Exception as exc:
                traceback.print_exc()
                rows.append(
                    {
                        "model": name,
                        "method": method,
                        "peer": peer,
                        "check": case.get("check"),
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
                continue
            row = {
                "model": name,
                "method": method,
                "peer": peer,
                "input": size,
                "compared": case.get("resolution", "layer"),
                "classes": classes,
                **result,
                "seconds": round(time.perf_counter() - started, 2),
            }
            if case.get("check"):
                row["check"] = case["check"]
            elif not row["agree_1e-3"]:
                row["reason"] = REASONS.get((method, peer), "not explained")
            rows.append(row)
            label = f"  check: {case['check']}" if case.get("check") else ""
            print(
                f"{name:9} {method:18} {peer:16} {row['compared']:5} {size:3} "
                f"max {row['max_abs']:.2e} mean {row['mean_abs']:.2e} "
                f"r {fmt(row['pearson_min'])} rho {fmt(row['spearman_min'])} "
                f"1e-5 {'yes' if row['agree_1e-5'] else 'no ':3} "
                f"1e-3 {'yes' if row['agree_1e-3'] else 'no ':3} ({row['seconds']} s){label}",
                flush=True,
            )
            if row.get("reason"):
                print(f"{'':10}why: {row['reason']}")
    for s in skipped:
        print(f"skipped {s['method']} / {s['peer']}: {s['reason']}")

    out = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peers": peers,
        "layer": LAYER,
        "images": args.images,
        "normaliser": "ReLU, then min-max per map (float64), applied to both sides",
        "score_family": (
            f"ScoreCAM, ISCAM, AblationCAM: resnet18 {LAYER}, {args.score_size}x"
            f"{args.score_size} inputs, {min(args.images, args.score_images)} images"
        ),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "skipped": skipped,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
