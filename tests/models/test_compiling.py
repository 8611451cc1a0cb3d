"""``[model] compile``: the compiled plain forward gives the eager logits, CAM passes keep their
hooks (and their maps), and a mode the device cannot run or the task does not take is a clear
manifest error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.cam import METHODS
from app.models.compiling import CompiledForward, padded_size
from app.models.loading import LoadedModel, load_model
from app.models.manifest import ManifestError, parse_manifest
from app.pipeline.passes import CamItem, CamPlan, run_cam_pass, run_forward_pass
from tests.fixtures_models import FIXTURE_MODULE, build_tiny, fixture_access, write_model


def _write(store: Path, name: str, compile_line: str, *, task: str = "") -> Path:
    torch.manual_seed(0)
    folder = write_model(
        store,
        name,
        build_tiny(),
        architecture=f"{FIXTURE_MODULE}:build_tiny",
        num_classes=3,
        input_size=32,
        target_layers=["features"],
        kwargs=compile_line,
    )
    if task:
        manifest = folder / "model.toml"
        manifest.write_text(f'task = "{task}"\n' + manifest.read_text())
    return folder


def _load(store: Path, name: str, device: str = "cpu") -> LoadedModel:
    spec = parse_manifest(store / name, access=fixture_access(store))
    return load_model(spec, torch.device(device))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel]:
    """The same weights loaded eager and compiled (inductor: compiles once for the module)."""
    store = tmp_path_factory.mktemp("store")
    _write(store, "eager", "")
    _write(store, "compiled", 'compile = "compile"')
    return _load(store, "eager"), _load(store, "compiled")


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_default_is_eager(tmp_path: Path) -> None:
    _write(tmp_path, "m", "")
    spec = parse_manifest(tmp_path / "m", access=fixture_access(tmp_path))
    assert spec.compile == "off"


def test_compiled_logits_are_the_eager_ones(pair: tuple[LoadedModel, LoadedModel]) -> None:
    eager, compiled = pair
    assert eager.compiled is None
    assert isinstance(compiled.compiled, CompiledForward)
    for count, seed in ((1, 0), (3, 1), (5, 2)):  # past the warm-up's sizes too
        items = [_images(count, seed)]
        want = run_forward_pass(eager, items)[0].logits
        got = run_forward_pass(compiled, items)[0].logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["GradCAM", "ScoreCAM", "LayerCAM"])
def test_cam_passes_keep_their_hooks_and_maps(
    pair: tuple[LoadedModel, LoadedModel], method: str
) -> None:
    eager, compiled = pair
    plan = CamPlan(method, METHODS[method], ("features",), (), normalized=True)
    item = CamItem(_images(2, 3))
    [want] = run_cam_pass(eager, plan, [item])
    [got] = run_cam_pass(compiled, plan, [item])
    assert got.class_idx == want.class_idx
    for a, b in zip(got.cams, want.cams, strict=True):
        assert float(b.abs().max()) > 0  # a map with something in it
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_a_bad_value_names_the_key_and_the_choices(tmp_path: Path) -> None:
    _write(tmp_path, "m", 'compile = "fast"')
    with pytest.raises(ManifestError) as caught:
        parse_manifest(tmp_path / "m", access=fixture_access(tmp_path))
    message = str(caught.value)
    assert "[model] compile" in message
    assert all(choice in message for choice in ("'off'", "'compile'", "'cudagraphs'"))


def test_only_classifiers_take_it(tmp_path: Path) -> None:
    _write(tmp_path, "m", 'compile = "compile"', task="detection")
    with pytest.raises(ManifestError, match=r"compile = 'compile' is for classification"):
        parse_manifest(tmp_path / "m", access=fixture_access(tmp_path))


def test_cuda_graphs_are_refused_on_the_cpu(tmp_path: Path) -> None:
    _write(tmp_path, "m", 'compile = "cudagraphs"')
    with pytest.raises(ManifestError, match=r'"cudagraphs" needs a CUDA device.*runs on cpu'):
        _load(tmp_path, "m")


def test_cuda_graph_batches_are_padded_to_powers_of_two() -> None:
    assert [padded_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["compile", "cudagraphs"])
def test_on_cuda_each_mode_gives_the_eager_logits(tmp_path: Path, mode: str) -> None:
    _write(tmp_path, "eager", "")
    _write(tmp_path, "fast", f'compile = "{mode}"')
    eager, fast = _load(tmp_path, "eager", "cuda"), _load(tmp_path, "fast", "cuda")
    for count, seed in ((1, 0), (3, 1), (6, 2), (3, 4)):
        items = [_images(count, seed)]
        want = run_forward_pass(eager, items)[0].logits
        got = run_forward_pass(fast, items)[0].logits
        assert got.shape == (count, 3)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
