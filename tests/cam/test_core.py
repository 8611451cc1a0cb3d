"""What every method shares: hooks, batches, 3D, fusion, normalisation, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.cam import METHODS, GradCAM, LayerCAM, LeGrad, ScoreCAM, normalize_maps
from app.cam.core import _CAM, finite_number, optional_int

# LeGrad reads the attention of transformer blocks: its generic checks run on a ViT
# (tests/cam/test_legrad.py).
ALL = [m for m in METHODS.values() if m is not LeGrad]
OPTIONS = {
    "SmoothGradCAMpp": {"num_samples": 2, "seed": 0},
    "SSCAM": {"num_samples": 2, "seed": 0},
    "ISCAM": {"num_samples": 2},
    "AblationCAM": {"batch_size": 3},
    "RandomCAM": {"seed": 0},
    "DRISE": {"masks": 8, "grid": 4, "seed": 0},
}
#: RefineCAM multiplies the maps of several layers.
LAYERS = {"RefineCAM": ["conv", "feat"]}


def _shape(method, layer_shape, input_shape):
    """A method's map shape: the target layer's, or the input's for the guided methods and for
    FullGrad (it takes no layer)."""
    at_input = getattr(method, "input_resolution", False) or not method.takes_layers
    return input_shape if at_input else layer_shape


def _run(method, model, x, classes, layer="feat", **kwargs):
    shape = tuple(x.shape[1:])
    opts = OPTIONS.get(method.__name__, {})
    layer = LAYERS.get(method.__name__, layer)
    with method(model, layer, input_shape=shape, **opts) as extractor:
        context = torch.enable_grad() if method.requires_grad else torch.inference_mode()
        with context:
            scores = model(x)
        return extractor(classes, scores, **kwargs)


def test_methods_registry_names():
    assert list(METHODS) == [
        "CAM",
        "GradCAM",
        "GradCAMpp",
        "XGradCAM",
        "LayerCAM",
        "SmoothGradCAMpp",
        "ScoreCAM",
        "SSCAM",
        "ISCAM",
        "HiResCAM",
        "GradCAMElementWise",
        "EigenCAM",
        "EigenGradCAM",
        "AblationCAM",
        "RefineCAM",
        "FinerCAM",
        "LeGrad",
        "GuidedBackprop",
        "GuidedGradCAM",
        "DFF",
        "FullGrad",
        "ShapleyCAM",
        "KPCACAM",
        "FEM",
        "RandomCAM",
        "DRISE",
    ]
    assert all(issubclass(cls, _CAM) for cls in METHODS.values())


@pytest.mark.parametrize("method", [m for m in ALL if m.__name__ != "RandomCAM"])
def test_batch_maps_equal_single_sample_maps(tiny_net, method):
    """(Not RandomCAM: sample i gets the i-th draw, tests/cam/test_baseline.py.)"""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    classes = [2, 0, 1]
    batch = _run(method, tiny_net, x, classes)[0]
    # FullGrad takes no layer, and the guided methods map the input: input resolution.
    assert batch.shape == (3, *_shape(method, (8, 8), (16, 16)))
    for i in range(3):
        single = _run(method, tiny_net, x[i : i + 1], [classes[i]])[0]
        torch.testing.assert_close(batch[i : i + 1], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_maps_are_finite_and_normalised(tiny_net, method):
    maps = _run(method, tiny_net, torch.randn(2, 3, 16, 16), [0, 1])[0]
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", [m for m in ALL if m.__name__ != "RandomCAM"])
def test_a_non_finite_image_leaves_the_other_maps_of_its_batch_alone(tiny_net, method, bad):
    """A NaN or inf pixel in one image gives that image a finite map (non-finite values count
    as 0, as everywhere in the engine) and changes no other image's map."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    poisoned = x.clone()
    poisoned[0, :, 5, 5] = bad
    batch = _run(method, tiny_net, poisoned, [1, 2])[0]
    assert torch.isfinite(batch).all()
    assert batch.min() >= 0 and batch.max() <= 1
    alone = _run(method, tiny_net, x[1:], [2])[0]
    torch.testing.assert_close(batch[1:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in ALL if not m.class_agnostic])
def test_class_idx_checks(tiny_net, method):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="one class index per sample"):
        _run(method, tiny_net, x, [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        _run(method, tiny_net, x, [0, 3])
    with pytest.raises(ValueError, match="non-negative"):
        _run(method, tiny_net, x, [-1, 0])
    with pytest.raises(TypeError):
        _run(method, tiny_net, x, "0")


def test_numpy_class_indices_are_ints(tiny_net):
    """np.argmax gives numpy ints: the guide's "int or list[int]" takes them."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    want = _run(GradCAM, tiny_net, x, [2, 0])[0]
    torch.testing.assert_close(_run(GradCAM, tiny_net, x, list(np.array([2, 0])))[0], want)
    torch.testing.assert_close(_run(GradCAM, tiny_net, x[:1], np.int64(2))[0], want[:1])
    with pytest.raises(TypeError):
        _run(GradCAM, tiny_net, x, [np.float32(2), 0])


@pytest.mark.parametrize("method", [m for m in ALL if m.__name__ != "DRISE"])
def test_3d_inputs_give_volumetric_maps(tiny_net3d, method):
    """(Not DRISE: it masks images, tests/cam/test_drise.py.)"""
    x = torch.randn(2, 3, 6, 8, 8)
    maps = _run(method, tiny_net3d, x, [0, 2])[0]
    assert maps.shape == (2, *_shape(method, (3, 4, 4), (6, 8, 8)))
    assert torch.isfinite(maps).all()


def test_3d_automatic_layer(tiny_net3d):
    extractor = GradCAM(tiny_net3d, input_shape=(3, 6, 8, 8))
    assert extractor.target_names == ["feat"]


@pytest.mark.parametrize("method", ALL)
def test_unnormalised_maps_are_the_raw_relu_sum(tiny_net, method):
    x = torch.randn(2, 3, 16, 16)
    raw = _run(method, tiny_net, x, [1, 2], normalized=False)[0]
    norm = _run(method, tiny_net, x, [1, 2])[0]
    if method.__name__ == "RandomCAM":
        assert raw.min() >= -1 and raw.max() <= 1  # the draw itself, U(-1, 1)
    else:
        assert raw.min() >= 0
    torch.testing.assert_close(normalize_maps(raw), norm, rtol=1e-5, atol=1e-5)


def test_several_layers_one_map_each_and_fusion():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    layers = ["layer2", "layer3", "layer4"]
    for method in ALL:
        if method.reads_head:
            continue  # CAM and DFF read the head's weights: only the pooled layer applies
        if method.masked_forwards or method.noisy_forwards:
            continue  # covered on the tiny model; too slow on a ResNet for a unit test
        if method.one_map:
            continue  # one map for all its layers: tests/cam/test_composite.py, test_guided.py
        if not method.takes_layers:
            continue  # FullGrad: one map of the whole network, tests/cam/test_fullgrad.py
        with method(model, layers, input_shape=(3, 64, 64)) as extractor:
            maps = extractor([0, 1], model(x))
            if getattr(method, "input_resolution", False):
                assert [m.shape for m in maps] == [(2, 64, 64)] * 3
                continue
            assert [m.shape for m in maps] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
            fused = extractor.fuse_cams(maps)
            assert fused.shape == (2, 8, 8)
            assert method.fuse_cams(maps, target_shape=(16, 16)).shape == (2, 16, 16)
            assert fused.min() >= 0 and fused.max() <= 1


def test_class_agnostic_methods_ignore_the_class(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    for method in [m for m in ALL if m.class_agnostic]:
        first = _run(method, tiny_net, x, [0, 1])[0]
        torch.testing.assert_close(_run(method, tiny_net, x, [2, 2])[0], first)
        torch.testing.assert_close(_run(method, tiny_net, x, None)[0], first)


def test_fuse_cams_refuses_a_tensor():
    maps = torch.rand(3, 4, 4)
    with pytest.raises(TypeError, match="list of maps"):
        GradCAM.fuse_cams(maps)


def test_fusion_is_the_max_of_resized_maps():
    a = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]])
    b = torch.zeros(1, 2, 2)
    b[0, 1, 1] = 0.8
    torch.testing.assert_close(GradCAM.fuse_cams([a, b]), normalize_maps(torch.maximum(a, b)))
    with pytest.raises(ValueError):
        GradCAM.fuse_cams([])


def test_normalize_flat_maps_are_zeros_not_nan():
    maps = torch.stack([torch.full((3, 3), 5.0), torch.arange(9.0).reshape(3, 3)])
    out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(3, 3))
    assert out[1].min() == 0 and out[1].max() == 1


def test_hooks_removed_on_exit_even_after_an_exception(tiny_net):
    with pytest.raises(KeyError):
        with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)):
            assert tiny_net.feat._forward_hooks
            raise KeyError("boom")
    assert not tiny_net.feat._forward_hooks
    assert not tiny_net._forward_pre_hooks


def test_hook_lifecycle(tiny_net):
    extractor = ScoreCAM(tiny_net, "feat", input_shape=(3, 16, 16))
    x = torch.randn(1, 3, 16, 16)
    extractor.disable_hooks()
    tiny_net(x)
    with pytest.raises(RuntimeError, match="No activation recorded"):
        extractor(0, tiny_net(x))
    extractor.enable_hooks()
    scores = tiny_net(x)
    assert extractor(0, scores)[0].shape == (1, 8, 8)
    extractor.reset_hooks()
    with pytest.raises(RuntimeError, match="No activation recorded"):
        extractor(0, scores)
    extractor.remove_hooks()
    extractor.remove_hooks()  # idempotent
    assert not tiny_net.feat._forward_hooks and not tiny_net._forward_pre_hooks


GRADIENT_METHODS = [m for m in ALL if m.requires_grad]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("aug_smooth", [False, True])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_a_gradient_method_called_under_no_grad_after_a_grad_forward_works(
    tiny_net, method, aug_smooth, mode
):
    """``with torch.no_grad(): extractor(c, scores)`` after a forward with gradients: the call
    takes its backward anyway (it raised 'the score carries no autograd graph', and FullGrad
    torch's own 'element 0 of tensors does not require grad')."""
    if aug_smooth and not method.aug_smoothable:
        pytest.skip("no aug_smooth")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want = _run(method, tiny_net, x, [0, 2], aug_smooth=aug_smooth)
    opts = OPTIONS.get(method.__name__, {})
    layers = LAYERS.get(method.__name__, "feat")
    with method(tiny_net, layers, input_shape=(3, 16, 16), **opts) as extractor:
        scores = tiny_net(x)
        with mode():
            got = extractor([0, 2], scores, aug_smooth=aug_smooth)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert all(p.grad is None for p in tiny_net.parameters())


class _UnusedBranch(nn.Module):
    """A model with a submodule its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(3, 4, 3)
        self.unused = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.used(x).mean(dim=(2, 3)))


def test_a_target_layer_the_forward_never_calls_is_named_as_such():
    model = _UnusedBranch()
    with GradCAM(model, "unused", input_shape=(3, 8, 8)) as extractor:
        scores = model(torch.randn(1, 3, 8, 8))
        with pytest.raises(RuntimeError, match=r"\['unused'\].*forward ran but never called"):
            extractor(0, scores)


class _BatchNormNet(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU (``feat``) → GAP → dropout → Linear, with running
    statistics of its own; its second BatchNorm frozen (eval mode) in a train-mode model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.feat = nn.ReLU()
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 3)
        )
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        self.train()
        self.bn2.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(self.feat(self.bn2(self.conv2(x))))


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in model.buffers()]


@pytest.mark.parametrize("aug_smooth", [False, True])
@pytest.mark.parametrize("method", ALL)
def test_a_call_on_a_train_mode_model_leaves_its_statistics_and_modes(method, aug_smooth):
    """The engine's own forwards (masked, noisy, guided, aug_smooth's variants) run in eval mode:
    they moved a train-mode model's BatchNorm statistics, and each chunk of masked inputs was
    normalised by its own batch statistics."""
    if aug_smooth and not method.aug_smoothable:
        pytest.skip("takes no aug_smooth")
    model = _BatchNormNet()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with method(
        model,
        LAYERS.get(method.__name__, "feat"),
        input_shape=(3, 8, 8),
        **OPTIONS.get(method.__name__, {}),
    ) as extractor:
        with torch.enable_grad() if method.requires_grad else torch.inference_mode():
            scores = model(x)
        before = _bn_state(model)
        if method.__name__ in ("FullGrad", "CAM", "DFF") and not aug_smooth:
            # FullGrad reads the running statistics, which the hooked forward did not use; the
            # dropout of the hooked forward fed CAM's head something else than the pooled layer.
            with pytest.raises(ValueError, match=r"eval mode \(model.eval\(\)\)"):
                extractor([0, 1], scores)
        else:
            maps = extractor([0, 1], scores, aug_smooth=aug_smooth)[0]
            assert torch.isfinite(maps).all()
        for got, want in zip(_bn_state(model), before, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == [m is not model.bn2 for m in model.modules()]


def test_two_extractors_on_one_model_do_not_corrupt_each_other(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    expected = _run(GradCAM, tiny_net, x, [0, 1])[0]
    with (
        GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as grad,
        ScoreCAM(tiny_net, "feat", input_shape=(3, 16, 16), batch_size=2) as score,
    ):
        scores = tiny_net(x)
        score([1, 1], scores)  # runs many masked forwards through the same hooked layer
        torch.testing.assert_close(grad([0, 1], scores)[0], expected)


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("GradCAM", {}, 0),
        ("CAM", {}, 0),
        ("ScoreCAM", {}, 2 * 64),
        ("SSCAM", {}, 2 * 64 * 35),
        ("SSCAM", {"num_samples": 4}, 2 * 64 * 4),
        ("ISCAM", {}, 2 * 64 * 10),
        ("SmoothGradCAMpp", {}, 2 * 4),
        ("SmoothGradCAMpp", {"num_samples": 8}, 2 * 8),
    ],
)
def test_extra_forwards_count_masked_and_noisy_forwards(
    method: str, options: dict[str, int], expected: int
) -> None:
    shapes = [(1, 48, 8, 8), (1, 16, 4, 4)]
    count = METHODS[method].extra_forwards(shapes, options, images=2)
    assert count.total == expected
    if expected:
        assert count.images == 2
        assert count.channels == (64 if METHODS[method].masked_forwards else 1)


@pytest.mark.parametrize("method", [GradCAM, LayerCAM])
def test_fuse_cams_of_one_map_returns_it_unchanged(method):
    # LayerCAM rescales the maps it fuses; a single map is not fused, so not rescaled either.
    only = torch.tensor([[[0.0, 3.0], [1.5, 0.5]]])
    assert method.fuse_cams([only]) is only


def test_hooks_record_only_the_forwards_of_their_own_scope(tiny_net):
    from app.cam.core import hook_scope

    mine, other = object(), object()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with hook_scope(mine):
        extractor = GradCAM(tiny_net, "feat", input_shape=(3, 8, 8))
    with extractor, torch.enable_grad():
        with hook_scope(mine):
            scores = tiny_net(x)
        recorded = extractor._activations[0]
        with hook_scope(other):
            tiny_net(y)  # another pass's forward, while this extractor's hooks stay on
        tiny_net(y)  # and one outside every scope
        assert extractor._activations[0] is recorded
        with hook_scope(mine):
            maps = extractor([0, 1], scores)
    torch.testing.assert_close(maps[0], _run(GradCAM, tiny_net, x, [0, 1])[0])


# ------------------------------------------------------------------------------------ pauses
#: The methods whose calls run extra forwards, where a call may pause.
EXTRA = [m for m in ALL if m.masked_forwards or m.noisy_forwards]
#: Several chunks per call, so that it pauses in several forwards.
SMALL_CHUNKS = {"SmoothGradCAMpp": {"num_samples": 10}, "AblationCAM": {"batch_size": 3}}


def _hosted(method, model, x, pause=None, **options):
    """``method``'s maps of ``x`` for classes [0, 1], with ``pause`` given to the call; the
    options of ``OPTIONS`` and ``SMALL_CHUNKS`` with ``options`` on top."""
    name = method.__name__
    opts = {**OPTIONS.get(name, {}), **SMALL_CHUNKS.get(name, {}), **options}
    with method(model, "feat", input_shape=tuple(x.shape[1:]), **opts) as extractor:
        context = torch.enable_grad() if method.requires_grad else torch.inference_mode()
        with context:
            scores = model(x)
        return extractor([0, 1], scores, pause=pause)


def _guest_gradcam(model, x):
    """A GradCAM pass of its own (its scope, its forward), as a caller runs one in a pause; an
    error is returned, not raised."""
    from app.cam.core import hook_scope

    try:
        with hook_scope(object()), torch.inference_mode(False):
            return _run(GradCAM, model, x, [2, 1])[0]
    except ValueError as error:
        return error


def _inputs():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return x, y


@pytest.mark.parametrize("method", EXTRA, ids=lambda m: m.__name__)
@pytest.mark.parametrize("fast_path", [True, False], ids=["", "slow"])
def test_a_call_pauses_before_each_leaf_module_its_extra_forwards_run(tiny_net, method, fast_path):
    if not fast_path and method is not METHODS["AblationCAM"]:
        pytest.skip("only Ablation-CAM has a fast path")
    options = {} if fast_path else {"fast_path": False}
    x, _ = _inputs()
    calls = []  # the leaf modules' calls during the extractor's call
    leaves = [m for m in tiny_net.modules() if next(m.children(), None) is None]
    with method(
        tiny_net,
        "feat",
        input_shape=(3, 8, 8),
        **{**OPTIONS.get(method.__name__, {}), **SMALL_CHUNKS.get(method.__name__, {}), **options},
    ) as extractor:
        context = torch.enable_grad() if method.requires_grad else torch.inference_mode()
        with context:
            scores = tiny_net(x)
        counters = [
            leaf.register_forward_pre_hook(lambda _m, _a: calls.append(1)) for leaf in leaves
        ]
        pauses = []
        try:
            extractor([0, 1], scores, pause=lambda: pauses.append(1))
        finally:
            for counter in counters:
                counter.remove()
    assert len(calls) >= 2 * 2  # at least two extra forwards (the tail: pool and fc)
    assert len(pauses) == len(calls)


@pytest.mark.parametrize("method", [m for m in ALL if m not in EXTRA], ids=lambda m: m.__name__)
def test_a_call_without_extra_forwards_never_pauses(tiny_net, method):
    x, _ = _inputs()
    pauses = []
    _run(method, tiny_net, x, [0, 1], pause=lambda: pauses.append(1))
    assert pauses == []


@pytest.mark.parametrize("method", EXTRA, ids=lambda m: m.__name__)
@pytest.mark.parametrize("fast_path", [True, False], ids=["", "slow"])
def test_a_pass_run_in_every_pause_leaves_both_answers_as_if_alone(tiny_net, method, fast_path):
    """Another pass (GradCAM, in its own hook scope) runs at every pause of the call, so at
    every position inside the extra forwards where a scheduler could put it."""
    if not fast_path and method is not METHODS["AblationCAM"]:
        pytest.skip("only Ablation-CAM has a fast path")
    options = {} if fast_path else {"fast_path": False}
    x, y = _inputs()
    guest_alone = _guest_gradcam(tiny_net, y)
    alone = _hosted(method, tiny_net, x, **options)
    seen = []
    hosted = _hosted(
        method, tiny_net, x, pause=lambda: seen.append(_guest_gradcam(tiny_net, y)), **options
    )
    assert len(seen) >= 4
    for a, b in zip(hosted, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for maps in seen:
        torch.testing.assert_close(maps, guest_alone, rtol=1e-5, atol=1e-5)


def test_an_unscoped_ablation_hook_would_corrupt_a_pass_run_in_a_pause(tiny_net, monkeypatch):
    """The check above can fail: Ablation-CAM's hook that swaps in the ablated activation must
    leave the forwards of other scopes alone."""
    ablation = METHODS["AblationCAM"]
    monkeypatch.setattr(ablation, "_ablate", lambda _self, ablated, *_args: ablated)
    x, y = _inputs()
    guest_alone = _guest_gradcam(tiny_net, y)
    seen = []
    _hosted(
        ablation,
        tiny_net,
        x,
        pause=lambda: seen.append(_guest_gradcam(tiny_net, y)),
        fast_path=False,
    )
    assert seen
    assert any(
        isinstance(maps, ValueError) or not torch.allclose(maps, guest_alone, atol=1e-5)
        for maps in seen
    )


def test_the_constructors_number_rule_refuses_what_no_method_can_use() -> None:
    assert finite_number("k_std", 2) == 2.0 and finite_number("x", 0) == 0.0
    assert finite_number("ablation_ratio", 1, above=True, high=1.0) == 1.0
    for bad in (float("inf"), float("nan"), -1, True, "2", 10**400):
        with pytest.raises(ValueError, match=r"^k_std must be a finite number >= 0, got "):
            finite_number("k_std", bad)
    with pytest.raises(ValueError, match=r"kernel_gamma must be a finite number > 0, got 0"):
        finite_number("kernel_gamma", 0, above=True)
    with pytest.raises(ValueError, match=r"ablation_ratio must lie in \(0, 1\], got 1.5"):
        finite_number("ablation_ratio", 1.5, above=True, high=1.0)
    assert optional_int("seed", None) is None and optional_int("seed", 3) == 3
    with pytest.raises(ValueError, match="seed must be an int or None, got 1.5"):
        optional_int("seed", 1.5)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("SmoothGradCAMpp", {"std": float("inf")}),  # was taken: every noisy copy was NaN
        ("SmoothGradCAMpp", {"seed": "7"}),  # was taken, then failed inside torch at the call
        ("SSCAM", {"std": float("nan")}),
        ("FEM", {"k_std": 1e12}),  # was refused as "not finite"; it is only absurd: now taken
        ("ScoreCAM", {"chunk_ms": float("nan")}),
    ],
)
def test_each_constructor_checks_its_numbers_by_the_one_rule(method: str, options: dict) -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    name, value = next(iter(options.items()))
    cls = METHODS[method]
    if method == "FEM":
        with cls(model, "1", input_shape=(3, 8, 8), **options) as extractor:
            assert extractor.k_std == value
        return
    with pytest.raises(ValueError, match=rf"^{name} must "):
        cls(model, "1", input_shape=(3, 8, 8), **options)
    assert not model[1]._forward_hooks  # refused before any hook was registered
