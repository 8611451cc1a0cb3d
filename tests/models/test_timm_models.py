"""timm architectures: built from the manifest, preprocessing from the pretrained config,
default target layers from the feasibility trial, served over HTTP; and what fails clearly."""

from __future__ import annotations

import sys
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.models.manifest import ManifestError, parse_manifest
from app.models.registry import ModelRegistry
from tests.conftest import files, image_bytes

timm = pytest.importorskip("timm")

MANIFEST = """[model]
architecture = "timm:{name}"
{kwargs}
pretrained = false
weights = "weights.pt"
num_classes = 3
{preprocess}
"""
SMALL = """[preprocess]
input_shape = [3, {size}, {size}]
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
"""


def put_timm(
    store: Path, folder: str, name: str, *, size: int | None, kwargs: dict[str, int] | None = None
) -> Path:
    """A seeded timm model saved as a state_dict, with a manifest (``size`` None: no
    [preprocess] table)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **(kwargs or {}))
    path = store / folder
    path.mkdir(parents=True)
    torch.save(model.state_dict(), path / "weights.pt")
    preprocess = SMALL.format(size=size) if size else ""
    (path / "model.toml").write_text(
        MANIFEST.format(
            name=name,
            kwargs=f"kwargs = {{ {', '.join(f'{k} = {v}' for k, v in kwargs.items())} }}"
            if kwargs
            else "",
            preprocess=preprocess,
        )
    )
    return path


@pytest.fixture(scope="module")
def timm_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("timm_store")
    put_timm(store, "convnext", "convnext_atto", size=None)
    put_timm(store, "efficientnet", "efficientnet_b0", size=64)
    put_timm(
        store,
        "vit",
        "vit_tiny_patch16_224",
        size=32,
        kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
    )
    return store


def test_preprocessing_comes_from_the_pretrained_config(timm_store: Path) -> None:
    spec = parse_manifest(timm_store / "convnext")
    assert spec.input_shape == (3, 224, 224) and spec.crop == (224, 224)
    assert spec.resize == 256  # 224 / crop_pct 0.875
    assert spec.interpolation == "bicubic"
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert spec.std == pytest.approx((0.229, 0.224, 0.225))


def test_timm_models_load_with_default_layers_from_the_trial(timm_store: Path) -> None:
    registry = ModelRegistry(timm_store, torch.device("cpu"), "convnext")
    registry.discover()
    registry.load_all()
    assert {n: e.status for n, e in registry.entries.items()} == dict.fromkeys(
        ("convnext", "efficientnet", "vit"), "ready"
    ), {n: e.error for n, e in registry.entries.items()}
    saved = torch.load(timm_store / "efficientnet" / "weights.pt", weights_only=True)
    loaded = registry.get("efficientnet").module.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # The last layer with a spatial output, as for torchvision models; CAM finds the head.
    assert registry.get("convnext").target_layers == ("norm_pre",)
    assert registry.get("efficientnet").target_layers == ("bn2",)
    assert registry.get("convnext").methods["CAM"] is None
    assert registry.get("efficientnet").methods["CAM"] is None
    # A ViT's blocks emit tokens, laid on the patch grid: its last block's first norm, where
    # the class token still reads the patch tokens (vit_target), not the patch embedding.
    vit = registry.get("vit")
    assert vit.target_layers == ("blocks.1.norm1",)
    assert len(vit.layer_shapes["blocks.1.norm1"]) == 4  # (N, dim, H, W) as extractors read it
    reason = registry.get("vit").methods["LeGrad"] or ""
    assert "timm's own Attention" in reason and "[model] architecture" in reason


@pytest.mark.parametrize("name", ["convnext", "efficientnet", "vit"])
def test_timm_models_predict_and_explain_over_http(
    make_client: Callable[..., TestClient], timm_store: Path, name: str
) -> None:
    client = make_client(model_store=timm_store, default_model=name)
    predicted = client.post("/predict", files=files(image_bytes()), data={"model": name})
    assert predicted.status_code == 200, predicted.text
    explained = client.post(
        "/explain", files=files(image_bytes()), data={"model": name, "method": "GradCAM"}
    )
    assert explained.status_code == 200, explained.text
    assert explained.json()["target_layers"] == list(
        client.get(f"/models/{name}").json()["target_layers"]
    )


def test_without_timm_only_that_model_fails(
    timm_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ManifestError, match=r"pip install 'camserve\[timm\]'"):
        parse_manifest(timm_store / "convnext")


def test_unknown_timm_name_lists_close_ones(tmp_path: Path) -> None:
    folder = put_timm(tmp_path, "m", "efficientnet_b0", size=32)
    manifest = folder / "model.toml"
    manifest.write_text(manifest.read_text().replace("efficientnet_b0", "efficientnet_b00"))
    registry = ModelRegistry(tmp_path, torch.device("cpu"), "m")
    registry.discover()
    registry.load_all()
    error = registry.entry("m").error or ""
    assert "timm has no model 'efficientnet_b00'" in error and "efficientnet_b0" in error


def test_offline_torchvision_weights_name_the_file_and_url(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import torchvision.models._api as api

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    shutil.copytree(store / "resnet", tmp_path / "store" / "resnet")
    manifest = tmp_path / "store" / "resnet" / "model.toml"
    text = manifest.read_text().replace('"weights.pt"', '"IMAGENET1K_V1"')
    manifest.write_text(text.replace("kwargs = { num_classes = 5 }", "").replace("= 5", "= 1000"))
    (tmp_path / "store" / "resnet" / "labels.txt").unlink()
    manifest.write_text(manifest.read_text().replace('labels = "labels.txt"\n', ""))
    registry = ModelRegistry(tmp_path / "store", torch.device("cpu"), "resnet")
    registry.discover()
    registry.load_all()
    error = registry.entry("resnet").error or ""
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"put the file {expected} in place" in error, error
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in error
    assert "Name or service not known" in error


def test_offline_timm_weights_name_the_hub_cache_and_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm.models._builder as builder

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    folder = tmp_path / "store" / "m"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        '[model]\narchitecture = "timm:convnext_atto"\npretrained = true\nnum_classes = 1000\n'
    )
    registry = ModelRegistry(tmp_path / "store", torch.device("cpu"), "m")
    registry.discover()
    registry.load_all()
    error = registry.entry("m").error or ""
    hub_id = timm.models.get_pretrained_cfg("convnext_atto").hf_hub_id
    assert f"{tmp_path}/hf/hub/models--{hub_id.replace('/', '--')}" in error, error
    assert f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors" in error
