"""camserve's CAM engine: class activation maps for PyTorch classifiers.

from app.cam import GradCAM
with GradCAM(model, target_layer="layer4") as extractor:
    scores = model(batch)
    maps = extractor(scores.argmax(1).tolist(), scores)   # one (N, H, W) tensor per layer
"""

from app.cam.ablation import AblationCAM
from app.cam.activation import CAM, ISCAM, SSCAM, ScoreCAM, find_fc_layer
from app.cam.baseline import RandomCAM
from app.cam.colormaps import COLORMAPS, apply_colormap, colormap_lut
from app.cam.composite import FinerCAM, RefineCAM
from app.cam.core import (
    _CAM,
    CamInterrupted,
    ExtraForwards,
    PauseCallback,
    ProgressCallback,
    StopCheck,
    normalize_maps,
    resize_maps,
)
from app.cam.dff import DFF, Concepts, nmf
from app.cam.drise import DRISE
from app.cam.eigen import EigenCAM, EigenGradCAM
from app.cam.faithfulness import (
    confidence_change,
    confidence_drop,
    confidence_increase,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    randomization_check,
    randomize_model,
    spearman_correlation,
)
from app.cam.fem import FEM
from app.cam.fullgrad import FullGrad
from app.cam.gradient import (
    GradCAM,
    GradCAMElementWise,
    GradCAMpp,
    HiResCAM,
    LayerCAM,
    SmoothGradCAMpp,
    XGradCAM,
)
from app.cam.guided import GuidedBackprop, GuidedGradCAM, guided_relus
from app.cam.hierarchical import ChannelsLast, hierarchical_target
from app.cam.kpca import KPCACAM
from app.cam.layers import locate_candidate_layer
from app.cam.legrad import LeGrad
from app.cam.localization import best_iou, energy_pointing_game, iou_sweep, mask_iou, pointing_game
from app.cam.metrics import ClassificationMetric
from app.cam.names import close_matches, did_you_mean
from app.cam.options import MethodOption
from app.cam.overlay import blend, colorize, heatmap, mask_levels, overlay_mask, palette_image
from app.cam.shapley import ShapleyCAM
from app.cam.targets import ClassProbability, Target, class_probabilities
from app.cam.vit import TokensToGrid, ViTTarget, vit_target

METHODS: dict[str, type[_CAM]] = {
    cls.__name__: cls
    for cls in (
        CAM,
        GradCAM,
        GradCAMpp,
        XGradCAM,
        LayerCAM,
        SmoothGradCAMpp,
        ScoreCAM,
        SSCAM,
        ISCAM,
        HiResCAM,
        GradCAMElementWise,
        EigenCAM,
        EigenGradCAM,
        AblationCAM,
        RefineCAM,
        FinerCAM,
        LeGrad,
        GuidedBackprop,
        GuidedGradCAM,
        DFF,
        FullGrad,
        ShapleyCAM,
        KPCACAM,
        FEM,
        RandomCAM,
        DRISE,
    )
}


class UnknownMethod(ValueError):
    """A name ``METHODS`` does not hold; ``suggestion``: the closest one, or ``None``."""

    def __init__(self, name: str) -> None:
        found = close_matches(name, METHODS, n=1, fold_case=True)
        self.suggestion = found[0] if found else None
        hint = f" Did you mean {self.suggestion}?" if self.suggestion else ""
        super().__init__(f"Unknown CAM method {name[:100]!r}.{hint} Known: {', '.join(METHODS)}.")


def find_method(name: str) -> tuple[str, type[_CAM]]:
    """The method called ``name`` (case-insensitive): its canonical name and class. Raises
    ``UnknownMethod`` (a ``ValueError``) with the closest name otherwise."""
    wanted = name.strip().lower()
    for canonical, cls in METHODS.items():
        if canonical.lower() == wanted:
            return canonical, cls
    raise UnknownMethod(name.strip())


__all__ = [
    "Concepts",
    "DFF",
    "DRISE",
    "GuidedBackprop",
    "GuidedGradCAM",
    "guided_relus",
    "nmf",
    "AblationCAM",
    "ChannelsLast",
    "hierarchical_target",
    "FEM",
    "FullGrad",
    "KPCACAM",
    "RandomCAM",
    "ShapleyCAM",
    "CAM",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "GradCAMElementWise",
    "HiResCAM",
    "LeGrad",
    "MethodOption",
    "UnknownMethod",
    "close_matches",
    "did_you_mean",
    "find_method",
    "RefineCAM",
    "Target",
    "CamInterrupted",
    "ClassProbability",
    "ExtraForwards",
    "PauseCallback",
    "ProgressCallback",
    "StopCheck",
    "COLORMAPS",
    "GradCAM",
    "GradCAMpp",
    "ISCAM",
    "LayerCAM",
    "METHODS",
    "SSCAM",
    "ClassificationMetric",
    "ScoreCAM",
    "SmoothGradCAMpp",
    "TokensToGrid",
    "ViTTarget",
    "XGradCAM",
    "apply_colormap",
    "blend",
    "colorize",
    "colormap_lut",
    "best_iou",
    "class_probabilities",
    "confidence_change",
    "confidence_drop",
    "confidence_increase",
    "deletion_auc",
    "deletion_curve",
    "energy_pointing_game",
    "insertion_auc",
    "insertion_curve",
    "iou_sweep",
    "mask_iou",
    "pointing_game",
    "randomization_check",
    "randomize_model",
    "spearman_correlation",
    "find_fc_layer",
    "heatmap",
    "locate_candidate_layer",
    "mask_levels",
    "normalize_maps",
    "overlay_mask",
    "palette_image",
    "resize_maps",
    "vit_target",
]
