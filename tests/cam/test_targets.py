"""``targets=``: any output explained through callables, for every method whose objective is a
score; the same maps as ``class_idx`` on a model whose logit is that score."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.cam import CAM, METHODS, FinerCAM, GradCAM, LeGrad, ScoreCAM

TARGETED = [m for m in METHODS.values() if m.supports_targets and not m.class_agnostic]
OPTIONS = {
    "SmoothGradCAMpp": {"num_samples": 2, "seed": 0},
    "SSCAM": {"num_samples": 2, "seed": 0},
    "ISCAM": {"num_samples": 2},
    "DRISE": {"masks": 16, "grid": 4, "seed": 0},
}


class TinySeg(nn.Module):
    """conv (stride 2) → ReLU (``feat``) → 1x1 conv to 3 classes → upsample: (N, 3, 16, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.feat = nn.ReLU()
        self.classifier = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.feat(self.conv(x)))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


class TinyEmbedder(nn.Module):
    """conv (stride 2) → ReLU (``feat``) → GAP → Linear: a 5-d embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.feat = nn.ReLU()
        self.project = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.feat(self.conv(x)).mean((2, 3)))


class ScoreAsLogit(nn.Module):
    """The same model whose only 'logit' is target(output of each sample)."""

    def __init__(self, model: nn.Module, target) -> None:
        super().__init__()
        self.model = model
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.target(o) for o in self.model(x)])[:, None]


def _maps(method, model, layers, x, **call):
    opts = OPTIONS.get(method.__name__, {})
    if method.__name__ == "RefineCAM":
        layers = [layers.replace("feat", "conv"), layers]
    with method(model, layers, input_shape=(3, 16, 16), **opts) as extractor:
        context = torch.enable_grad() if method.requires_grad else torch.inference_mode()
        with context:
            scores = model(x)
        return extractor(scores=scores, **call)[0]


def _mask() -> torch.Tensor:
    mask = torch.zeros(16, 16)
    mask[4:12, 2:9] = 1
    return mask


@pytest.mark.parametrize("method", TARGETED, ids=lambda m: m.__name__)
def test_segmentation_region_score(method):
    torch.manual_seed(0)
    model = TinySeg().eval()
    x = torch.randn(2, 3, 16, 16)
    mask = _mask()

    def region(output: torch.Tensor) -> torch.Tensor:
        return (output[1] * mask).sum()  # the class-1 logits summed over a region

    got = _maps(method, model, "feat", x, targets=region)
    expected = _maps(method, ScoreAsLogit(model, region), "model.feat", x, class_idx=0)
    at_input = getattr(method, "input_resolution", False) or not method.takes_layers
    assert got.shape == ((2, 16, 16) if at_input else (2, 8, 8))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", TARGETED, ids=lambda m: m.__name__)
def test_embedding_cosine_similarity_one_target_per_sample(method):
    torch.manual_seed(0)
    model = TinyEmbedder().eval()
    x = torch.randn(2, 3, 16, 16)
    references = torch.randn(2, 5)

    def similarity(i: int):
        return lambda e: F.cosine_similarity(e, references[i], dim=0)

    got = _maps(method, model, "feat", x, targets=[similarity(0), similarity(1)])
    for i in range(2):
        wrapped = ScoreAsLogit(model, similarity(i))
        single = _maps(method, wrapped, "model.feat", x[i : i + 1], class_idx=0)
        torch.testing.assert_close(got[i : i + 1], single, rtol=1e-4, atol=1e-5)


def test_class_target_equals_class_idx(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    for method in (GradCAM, ScoreCAM):
        by_index = _maps(method, tiny_net, "feat", x, class_idx=[2, 0])
        by_target = _maps(method, tiny_net, "feat", x, targets=[lambda o: o[2], lambda o: o[0]])
        torch.testing.assert_close(by_target, by_index)


def test_per_sample_list_outputs_such_as_detections(tiny_net):
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_net

        def forward(self, x):
            return [{"scores": row, "boxes": torch.zeros(1, 4)} for row in self.model(x)]

    detector = Detector()
    x = torch.randn(2, 3, 16, 16)
    with GradCAM(detector, "model.feat", input_shape=(3, 16, 16)) as extractor:
        maps = extractor(scores=detector(x), targets=lambda d: d["scores"][1])[0]
    torch.testing.assert_close(maps, _maps(GradCAM, tiny_net, "feat", x, class_idx=1))


def test_exactly_one_of_class_idx_and_targets(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        scores = tiny_net(x)
        with pytest.raises(ValueError, match="not both"):
            extractor(0, scores, targets=lambda o: o[0], retain_graph=True)
        with pytest.raises(ValueError, match="class_idx .* or targets"):
            extractor(scores=scores, retain_graph=True)
        with pytest.raises(ValueError, match="2 samples"):
            extractor(scores=scores, targets=[lambda o: o[0]], retain_graph=True)
        with pytest.raises(TypeError, match="callable"):
            extractor(scores=scores, targets=[0, 1], retain_graph=True)
        with pytest.raises(ValueError, match="scalar"):
            extractor(scores=scores, targets=lambda o: o, retain_graph=True)
        with pytest.raises(RuntimeError, match="Python number"):
            extractor(scores=scores, targets=lambda o: torch.tensor(1.0), retain_graph=True)
        with pytest.raises(ValueError, match="targets="):
            extractor(0, scores.unsqueeze(-1))  # class_idx on a non-logit output


def test_methods_that_explain_classes_only_say_so(tiny_net):
    x = torch.randn(1, 3, 16, 16)
    for method in (CAM, FinerCAM):
        with method(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
            with pytest.raises(ValueError, match="does not take targets"):
                extractor(scores=tiny_net(x), targets=lambda o: o[0])
    assert not LeGrad.supports_targets


def test_class_probabilities_by_rule() -> None:
    from app.cam import ClassProbability, class_probabilities

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(class_probabilities(logits), logits.softmax(-1))
    assert torch.allclose(class_probabilities(logits, "sigmoid"), logits.sigmoid())
    assert torch.allclose(class_probabilities(logits).sum(-1), torch.ones(2))
    assert float(class_probabilities(logits, "sigmoid")[1].sum()) == pytest.approx(1.5)
    assert float(ClassProbability(0, "sigmoid")(logits[0])) == pytest.approx(
        1 / (1 + math.exp(-2.0))
    )
    assert float(ClassProbability(2)(logits[0])) == pytest.approx(float(logits[0].softmax(-1)[2]))
    with pytest.raises(ValueError, match="softmax, sigmoid"):
        ClassProbability(0, "relu")  # type: ignore[arg-type]


class _Logits:
    """A Hugging Face-style output: the logits in ``.logits``."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _NotLogits(nn.Module):
    """``tiny_net`` whose forward returns its logits inside a tuple, a dict or an object."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, logits.detach()
        if self.kind == "dict":
            return {"logits": logits, "aux": logits.detach()}
        return _Logits(logits)


class _LogitsOnly(nn.Module):
    """The usage guide's wrapper."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return (
            out[0]
            if isinstance(out, tuple)
            else out["logits"]
            if isinstance(out, dict)
            else out.logits
        )


CLASS_METHODS = [m for m in METHODS.values() if not m.class_agnostic and m is not LeGrad]


@pytest.mark.parametrize(
    ("kind", "access"), [("tuple", "[0]"), ("dict", "['logits']"), ("hf", ".logits")]
)
@pytest.mark.parametrize("method", [m for m in CLASS_METHODS if m.uses_scores or m.uses_input])
def test_an_output_that_is_not_the_logits_names_the_wrapper_that_gives_them(
    tiny_net, method, kind, access
):
    """A tuple, a dict or an object with .logits: every method that reads the output says what
    it got and the guide's fix (it said 'scores must be the model's logits ... pass targets='),
    and the guide's LogitsOnly wrapper gives the map of the bare model."""
    if method is CAM:
        pytest.skip("CAM reads the head, not the output")
    model = _NotLogits(tiny_net, kind).eval()
    opts = {**OPTIONS.get(method.__name__, {}), "input_shape": (3, 16, 16)}
    layers = ["net.conv", "net.feat"] if method.__name__ == "RefineCAM" else "net.feat"
    x = torch.randn(2, 3, 16, 16)
    with method(model, layers, **opts) as extractor:
        with pytest.raises(ValueError, match=rf"LogitsOnly.*self\.model\(x\){re.escape(access)}"):
            extractor([0, 2], model(x))
    wrapped = _LogitsOnly(model)
    with method(
        wrapped,
        ["model." + n for n in layers] if isinstance(layers, list) else "model." + layers,
        **opts,
    ) as extractor:
        got = extractor([0, 2], wrapped(x))
    with method(
        tiny_net, [n[4:] for n in layers] if isinstance(layers, list) else "feat", **opts
    ) as extractor:
        want = extractor([0, 2], tiny_net(x))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


class _Backbone(nn.Module):
    """Two stages whose feature maps are the output, as timm's features_only=True."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stage2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.stage1(x)
        return [first, self.stage2(first)]


@pytest.mark.parametrize("name", ["GradCAM", "ScoreCAM", "SmoothGradCAMpp"])
def test_a_backbone_s_feature_maps_name_the_class_agnostic_methods(name):
    """A features_only backbone: the message said to wrap it so that it returns its logits
    (self.model(x)[0], a feature map); it has none, and the class-agnostic methods work."""
    torch.manual_seed(0)
    model = _Backbone().eval()
    x = torch.randn(1, 3, 16, 16)
    with METHODS[name](model, "stage2", input_shape=(3, 16, 16)) as extractor:
        with pytest.raises(ValueError, match=r"list of 2 feature maps.*EigenCAM, KPCACAM, FEM"):
            extractor(0, model(x))
    with METHODS["EigenCAM"](model, "stage2", input_shape=(3, 16, 16)) as extractor:
        model(x)
        assert extractor(0)[0].shape == (1, 4, 4)
