"""CAM and the Score-CAM family against their papers' formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from app.cam import CAM, ISCAM, SSCAM, ScoreCAM, find_fc_layer, normalize_maps

SCORE_METHODS = [ScoreCAM, SSCAM, ISCAM]


def _activation(model, x):
    return model.feat(model.conv(x)).detach()


def _minmax(m: torch.Tensor) -> torch.Tensor:
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else torch.zeros_like(m)


def _naive_channel_scores(model, x, classes, method, **opts) -> torch.Tensor:
    """Algorithm 1 of each paper, one masked forward at a time."""
    a = _activation(model, x)
    n, k = a.shape[:2]
    scores = torch.zeros(n, k, dtype=torch.float64)
    noise = None
    if method is SSCAM:
        generator = torch.Generator().manual_seed(opts["seed"])
        noise = opts["std"] * torch.randn((opts["num_samples"], *x.shape[2:]), generator=generator)
    for i in range(n):
        for c in range(k):
            up = F.interpolate(
                a[i : i + 1, c : c + 1], size=x.shape[2:], mode="bilinear", align_corners=False
            )[0, 0]
            mask = _minmax(up)
            if method is ScoreCAM:
                variants = [mask]
            elif method is ISCAM and opts.get("schedule") == "linear":
                steps = opts["num_samples"]
                variants = [mask * (s + 1) / steps for s in range(steps)]
            elif method is ISCAM:
                # The authors' loop: the coefficient accumulates i/n at step i.
                steps, coefficient, variants = opts["num_samples"], 0.0, []
                for s in range(1, steps + 1):
                    coefficient += s / steps
                    variants.append(mask * coefficient)
            else:
                variants = [mask + noise[s] for s in range(opts["num_samples"])]
            probs = [model(x[i : i + 1] * v)[0, classes[i]] for v in variants]
            scores[i, c] = torch.stack(probs).double().mean()
    return scores


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        (ScoreCAM, {}),
        (ISCAM, {"num_samples": 3}),
        (ISCAM, {"num_samples": 3, "schedule": "linear"}),
        (SSCAM, {"num_samples": 3, "std": 0.5, "seed": 11}),
    ],
)
def test_score_family_matches_algorithm_1(tiny_net, method, opts):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    classes = [2, 0]
    with torch.no_grad():
        expected_scores = _naive_channel_scores(tiny_net, x, classes, method, **opts)
    weights = torch.softmax(expected_scores, dim=1)
    a = _activation(tiny_net, x).double()
    expected = torch.relu((weights[:, :, None, None] * a).sum(1))
    with method(tiny_net, "feat", input_shape=(3, 16, 16), batch_size=5, **opts) as extractor:
        with torch.inference_mode():
            scores = tiny_net(x)
        raw = extractor(classes, scores, normalized=False)[0]
        extractor.reset_hooks()
        with torch.inference_mode():
            scores = tiny_net(x)
        normalized = extractor(classes, scores)[0]
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(normalized.double(), normalize_maps(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_score_family_result_does_not_depend_on_batch_size(tiny_net, method):
    x = torch.randn(3, 3, 16, 16)
    opts = {"num_samples": 2} if method is not ScoreCAM else {}
    if method is SSCAM:
        opts["seed"] = 3
    maps = []
    for batch_size in (1, 4, 64):
        with method(
            tiny_net, "feat", input_shape=(3, 16, 16), batch_size=batch_size, **opts
        ) as extractor:
            with torch.inference_mode():
                scores = tiny_net(x)
            maps.append(extractor([0, 1, 2], scores)[0])
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps[0], maps[2], rtol=1e-5, atol=1e-6)


class _BatchRecorder:
    def __init__(self, model):
        self.largest = 0
        self.calls = 0
        model.register_forward_pre_hook(self)

    def __call__(self, _module, args):
        self.calls += 1
        self.largest = max(self.largest, args[0].shape[0])


@pytest.mark.parametrize("channels", [8, 64])
def test_masked_forwards_are_chunked_by_batch_size(channels):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 2),
    ).eval()
    recorder = _BatchRecorder(model)
    masks_seen = []
    with ScoreCAM(model, "1", input_shape=(3, 8, 8), batch_size=4) as extractor:
        original = extractor._masks

        def spy(maps, size):
            masks_seen.append(maps.shape[0])
            return original(maps, size)

        extractor._masks = spy
        with torch.inference_mode():
            scores = model(torch.randn(2, 3, 8, 8))
        extractor(0, scores)
    # Every masked forward and every block of masks held at once is bounded by batch_size,
    # whatever the number of channels.
    assert recorder.largest <= 4
    assert max(masks_seen) <= 4


def test_flat_channels_share_one_forward(tiny_net):
    recorder = _BatchRecorder(tiny_net)
    x = torch.randn(1, 3, 16, 16)
    with ScoreCAM(tiny_net, "feat", input_shape=(3, 16, 16), batch_size=1) as extractor:
        with torch.inference_mode():
            scores = tiny_net(x)
        calls_before = recorder.calls
        extractor(0, scores)
    # 4 channels, channel 0 is dead: 3 live masked forwards + 1 shared zero-mask forward.
    assert recorder.calls - calls_before == 4


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_score_family_without_scores_reruns_the_recorded_input(tiny_net, method):
    x = torch.randn(2, 3, 16, 16)
    opts = {"seed": 0} if method is SSCAM else {}
    with method(tiny_net, "feat", input_shape=(3, 16, 16), **opts) as extractor:
        with torch.inference_mode():
            scores = tiny_net(x)
        given = extractor([0, 2], scores)[0]
        rerun = extractor([0, 2])[0]
        torch.testing.assert_close(rerun, given)
        with pytest.raises(ValueError, match="out of range"):
            extractor([0, 3])


@pytest.mark.parametrize("method", SCORE_METHODS)
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_score_family_rejects_bad_batch_size(tiny_net, method, bad):
    with pytest.raises(ValueError, match="batch_size"):
        method(tiny_net, "feat", input_shape=(3, 16, 16), batch_size=bad)


def test_cam_matches_fc_weights(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    with CAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        with torch.inference_mode():
            tiny_net(x)
        raw = extractor([1, 2], normalized=False)[0]
    a = _activation(tiny_net, x)
    w = tiny_net.fc.weight.detach()[[1, 2]]
    expected = torch.relu((w[:, :, None, None] * a).sum(1))
    torch.testing.assert_close(raw, expected)
    assert extractor.fc_name == "fc"


@pytest.mark.parametrize(
    ("builder", "layer", "fc"),
    [
        ("resnet18", "layer4", "fc"),
        ("densenet121", "features", "classifier"),
        ("mobilenet_v2", "features", "classifier.1"),
        ("efficientnet_b0", "features", "classifier.1"),
    ],
)
def test_cam_resolves_the_head_of_single_linear_models(builder, layer, fc):
    torch.manual_seed(0)
    model = getattr(torchvision.models, builder)(num_classes=5).eval()
    assert find_fc_layer(model, layer, (3, 64, 64)) == fc
    with CAM(model, layer, input_shape=(3, 64, 64)) as extractor:
        with torch.inference_mode():
            model(torch.randn(1, 3, 64, 64))
        maps = extractor(3)[0]
    assert extractor.fc_name == fc and torch.isfinite(maps).all()


@pytest.mark.parametrize(
    ("builder", "reason"),
    [("vgg11", "3 nn.Linear"), ("mobilenet_v3_small", "2 nn.Linear"), ("squeezenet1_0", "no nn")],
)
def test_cam_refuses_multi_linear_and_linearless_heads(builder, reason):
    model = getattr(torchvision.models, builder)(num_classes=5).eval()
    with pytest.raises(ValueError, match=reason) as info:
        CAM(model, "features", input_shape=(3, 64, 64))
    assert "GradCAM" in str(info.value)


def test_cam_on_a_model_with_linear_layers_in_its_blocks_lists_a_few():
    """convnext_tiny's 37 nn.Linear layers (vit_tiny's 49, swin_tiny's 52) were all listed in
    the message, and only VGG and MobileNet v3 given as the reason."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])
    with pytest.raises(
        ValueError, match=r"10 nn.Linear layers \(\['0', '1', '2', '... 6 more', '9'\]\)"
    ):
        CAM(model, "0", input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="inside the blocks, as in ConvNeXt and transformers"):
        CAM(model, "0", input_shape=(3, 8, 8))


def test_cam_uses_an_explicit_compatible_fc_layer():
    class TwoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 6, 3, padding=1)
            self.aux = nn.Linear(6, 2)  # an auxiliary head: two Linear layers in all
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    torch.manual_seed(0)
    model = TwoLinears().eval()
    with pytest.raises(ValueError, match="2 nn.Linear"):
        CAM(model, "body", input_shape=(3, 8, 8))
    with CAM(model, "body", input_shape=(3, 8, 8), fc_layer="fc") as extractor:
        x = torch.randn(1, 3, 8, 8)
        with torch.inference_mode():
            model(x)
        raw = extractor(3, normalized=False)[0]
    expected = torch.relu(torch.einsum("k,nkhw->nhw", model.fc.weight[3], model.body(x)))
    torch.testing.assert_close(raw, expected.detach())
    with pytest.raises(ValueError, match="not an nn.Linear"):
        CAM(model, "body", input_shape=(3, 8, 8), fc_layer="body")


def test_cam_on_a_layer_the_head_does_not_pool_says_why():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    with CAM(model, "layer3", input_shape=(3, 64, 64)) as extractor:
        with torch.inference_mode():
            model(torch.randn(1, 3, 64, 64))
        with pytest.raises(ValueError, match="256 channels"):
            extractor(0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cam_on_a_reduced_precision_model_matches_its_fp32_map(dtype):
    """A bf16 model pools layer4 in bf16 (0.4% from the fp32 mean of its bf16 output): the head
    check allows its dtype's rounding, and the map is the fp32 model's."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = {}
    for precision, net in ((torch.float32, model), (dtype, copy.deepcopy(model).to(dtype))):
        with CAM(net, "layer4", input_shape=(3, 64, 64)) as extractor:
            with torch.inference_mode():
                net(x.to(precision))
            maps[precision] = extractor([1, 3], normalized=False)[0].float()
    torch.testing.assert_close(maps[dtype], maps[torch.float32], rtol=0.05, atol=0.05)


class _CatAvgMax(nn.Module):
    """conv → ``feat`` (6 channels) → cat(global avg, global max) → Linear(12 → 3): timm's
    global_pool='catavgmax'."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.feat(x)
        return self.fc(torch.cat([a.mean((2, 3)), a.amax((2, 3))], dim=1))


def test_cam_on_a_concatenating_pool_says_it_does_not_apply():
    """timm's resnet18 with global_pool='catavgmax' feeds its head 2 x 512 features of layer4:
    the message told to 'use the layer whose output the head pools (e.g. layer4)', the very
    layer given."""
    torch.manual_seed(0)
    model = _CatAvgMax().eval()
    with CAM(model, "feat", input_shape=(3, 8, 8)) as extractor:
        with torch.inference_mode():
            model(torch.randn(1, 3, 8, 8))
        with pytest.raises(ValueError, match=r"takes 12 features.*catavgmax.*GradCAM"):
            extractor(0)


def test_cam_class_index_out_of_range(tiny_net):
    with CAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        tiny_net(torch.randn(1, 3, 16, 16))
        with pytest.raises(ValueError, match="out of range"):
            extractor(3)


def test_cam_takes_a_1x1_convolution_head():
    class FullyConvolutional(nn.Module):
        """A 1x1-conv classifier on the map, then global pooling (same linear map as a Linear)."""

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
            self.classifier = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.classifier(self.body(x)).mean((2, 3))

    torch.manual_seed(0)
    model = FullyConvolutional().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        CAM(model, "body", input_shape=(3, 8, 8))
    with CAM(model, "body", input_shape=(3, 8, 8), fc_layer="classifier") as extractor:
        with torch.inference_mode():
            model(x)
        raw = extractor([3, 1], normalized=False)[0]
    w = model.classifier.weight.detach()[[3, 1], :, 0, 0]
    expected = torch.relu(torch.einsum("nk,nkhw->nhw", w, model.body(x).detach()))
    torch.testing.assert_close(raw, expected)
    strided = nn.Conv2d(6, 4, 1, stride=2)
    model.classifier = strided
    with pytest.raises(ValueError, match="1x1 convolution"):
        CAM(model, "body", input_shape=(3, 8, 8), fc_layer=strided)


def test_iscam_cumulative_schedule_reaches_n_plus_one_over_two():
    """The authors' code at n = 10 (``new_map += x * 0.1 * i``) ends at 5.5; linear ends at 1."""
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    with ISCAM(model, "1", input_shape=(3, 8, 8)) as extractor:
        assert extractor.schedule == "cumulative"
        torch.testing.assert_close(
            extractor.coefficients(),
            torch.tensor([0.1, 0.3, 0.6, 1.0, 1.5, 2.1, 2.8, 3.6, 4.5, 5.5]),
        )
    with ISCAM(model, "1", input_shape=(3, 8, 8), schedule="linear") as extractor:
        torch.testing.assert_close(extractor.coefficients(), torch.arange(1, 11) / 10)
    with pytest.raises(ValueError, match="schedule must be one of cumulative, linear"):
        ISCAM(model, "1", input_shape=(3, 8, 8), schedule="quadratic")


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_bf16_masked_forwards_keep_the_map_s_ranking(method):
    """bf16 autocast on the CPU: the maps stay fp32 and rank their pixels as fp32's do."""
    from app.cam import spearman_correlation

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    # layer2 at 32 px: 128 masked forwards of a small input (layer3 at 64 px, 256 forwards of
    # four times the pixels, took 116 s of the suite on 2 cores for the same 4 x 4 maps).
    x = torch.randn(1, 3, 32, 32)
    opts = {"num_samples": 2, "seed": 0} if method is SSCAM else {}
    opts = {"num_samples": 2} if method is ISCAM else opts
    maps = {}
    for precision in ("fp32", "bf16"):
        with method(
            model, "layer2", input_shape=(3, 32, 32), precision=precision, **opts
        ) as extractor:
            with torch.inference_mode():
                scores = model(x)
            maps[precision] = extractor([3], scores)[0]
        assert extractor._logits(x).dtype == (
            torch.bfloat16 if precision == "bf16" else torch.float32
        )
    assert maps["bf16"].dtype == torch.float32
    assert not torch.equal(maps["bf16"], maps["fp32"])  # bf16 did run
    assert float(spearman_correlation(maps["bf16"], maps["fp32"])[0]) >= 0.9


def test_precision_and_chunk_ms_are_checked():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        ScoreCAM(nn.Sequential(nn.Conv2d(3, 2, 1)), "0", precision="fp16")
    with pytest.raises(ValueError, match="chunk_ms"):
        ScoreCAM(nn.Sequential(nn.Conv2d(3, 2, 1)), "0", chunk_ms=0)


def test_on_the_cpu_chunks_keep_batch_size(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    with ScoreCAM(tiny_net, "feat", input_shape=(3, 16, 16), batch_size=3) as extractor:
        with torch.inference_mode():
            scores = tiny_net(x)
        extractor([0, 1], scores)
    assert extractor.chunk_sizes and set(extractor.chunk_sizes[:-1]) == {3}


def test_cam_refusing_its_layers_leaves_no_hook_on_the_model(tiny_net):
    with pytest.raises(ValueError, match="exactly one target layer"):
        CAM(tiny_net, ["conv", "feat"], input_shape=(3, 16, 16))
    assert not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in tiny_net.modules()
    )
