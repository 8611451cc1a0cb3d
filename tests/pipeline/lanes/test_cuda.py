"""The CUDA lane on a GPU: nvJPEG and the GPU's resize against the CPU lane. Skipped without
CUDA (the same code runs on the CPU in test_tensor.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from app.errors import CamserveError
from app.models.manifest import parse_manifest
from app.pipeline.decoding import Upload
from app.pipeline.lanes import lane_for
from app.pipeline.lanes.cpu import CpuLane
from app.pipeline.lanes.cuda import CudaLane
from tests.pipeline.lanes.helpers import encoded, levels, mean_level_gap, photo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

SHAPES = Path(__file__).resolve().parents[3] / "model_store" / "shapes"
LIMIT = 10**8


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return parse_manifest(SHAPES)


@pytest.fixture(scope="module")
def lane() -> CudaLane:
    return CudaLane(torch.device("cuda"))


def test_a_cuda_device_gets_the_cuda_lane() -> None:
    assert isinstance(lane_for(torch.device("cuda")), CudaLane)


@pytest.mark.parametrize("orientation", [None, 2, 5, 6, 8])
@pytest.mark.parametrize("size", [(640, 480), (3000, 2000)])
def test_nvjpeg_agrees_with_the_cpu_lane(lane, spec, orientation, size) -> None:  # type: ignore[no-untyped-def]
    upload = Upload("p.jpg", encoded(photo(size), "JPEG", orientation))
    (want,) = CpuLane().decode([upload], spec, LIMIT, 1024)
    (got,) = lane.decode([upload], spec, LIMIT, 1024)
    assert got.pixels is not None and got.pixels.device.type == "cuda"
    assert got.tensor.device.type == "cuda"
    assert (got.original_size, got.image.size, got.box) == (
        want.original_size,
        want.image.size,
        want.box,
    )
    assert mean_level_gap(got.pixels, levels(want.image)) <= 2.0
    assert mean_level_gap(got.tensor * 255, want.tensor * 255) <= 2.0 / min(spec.std)


def test_png_goes_through_pinned_staging(lane, spec) -> None:  # type: ignore[no-untyped-def]
    upload = Upload("p.png", encoded(photo((300, 200)), "PNG"))
    for _ in range(3):
        (got,) = lane.decode([upload], spec, LIMIT, 1024)
    assert got.pixels is not None and got.pixels.device.type == "cuda"
    assert lane.staging.pinned and lane.staging.allocated == 1


def test_corrupt_jpegs_get_the_cpu_lane_s_error(lane, spec) -> None:  # type: ignore[no-untyped-def]
    data = encoded(photo((640, 480)))
    upload = Upload("t.jpg", data[: len(data) // 2])
    errors = []
    for each in (CpuLane(), lane):
        with pytest.raises(CamserveError) as caught:
            each.decode([upload], spec, LIMIT, 1024)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]


def test_concurrent_requests_share_nvjpeg_calls_and_memory_stays_flat(lane, spec) -> None:  # type: ignore[no-untyped-def]
    uploads = [Upload(f"{i}.jpg", encoded(photo((640, 480), seed=i))) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: lane.decode([u], spec, LIMIT, 1024), uploads))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(5):
            list(pool.map(lambda u: lane.decode([u], spec, LIMIT, 1024), uploads))
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 1024 * 1024
    assert sum(lane.jpegs.calls) >= 16 * 6


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_gpu_pictures_agree_with_pillow(lane, spec, image_format) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from app.pipeline.budget import FairThreads
    from app.pipeline.rendering import NamedMap, RenderStyle, draw_maps
    from tests.pipeline.lanes.test_drawing import _pixels, _psnr

    upload = Upload("p.jpg", encoded(photo((640, 480)), "JPEG", 6))
    style = RenderStyle(outputs=("overlay", "heatmap"), image_format=image_format)
    cams = torch.rand(1, 7, 7, generator=torch.Generator().manual_seed(0))
    drawn = []
    for each in (CpuLane(), lane):
        decoded = each.decode([upload], spec, LIMIT, 1024)
        maps = [[NamedMap("feat", "layer", cams, normalized=False)]]
        threads = FairThreads(None)
        drawn.append(asyncio.run(draw_maps(threads, decoded, maps, style, spec.crop, each.painter)))
    want, got = drawn[0][0][0][0], drawn[1][0][0][0]
    assert (got["width"], got["height"], got["region"]) == (
        want["width"],
        want["height"],
        want["region"],
    )
    for name in ("overlay", "heatmap"):
        assert _psnr(_pixels(got[name]), _pixels(want[name])) >= 40


def test_the_service_on_cuda_uses_the_cuda_lane(make_client) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import files

    gpu = make_client(device="cuda")
    explainer = gpu.app.state.explainer
    assert isinstance(explainer.lane(explainer.registry.get("tiny")), CudaLane)
    data = encoded(photo((160, 120)), "JPEG", 6)
    form = {"model": "tiny", "method": "GradCAM", "output": "overlay,raw"}
    for image_format in ("jpeg", "png"):
        response = gpu.post(
            "/explain",
            files=files(data, name="p.jpg"),
            data={**form, "image_format": image_format},
        )
        assert response.status_code == 200, response.text
        first = response.json()["results"][0]["explanations"][0]["maps"][0]
        assert (first["width"], first["height"]) == (120, 160)


def _pictures(spec, lane, painter, upload, cams, threads=1):  # type: ignore[no-untyped-def]
    """The overlay and heatmap JPEGs of ``cams`` over ``upload``, drawn by ``painter`` from
    ``threads`` threads at once (each the same picture)."""
    from app.pipeline.rendering import PictureSize, RenderStyle

    style = RenderStyle(
        outputs=("overlay", "heatmap"),
        colormap="jet",
        image_format="jpeg",
        size=PictureSize.parse("original", 1024),
    )
    (decoded,) = lane.decode([upload], spec, LIMIT, 1024)

    def draw(_: int) -> tuple[str, str]:
        canvas = painter.canvas(decoded, style.size, spec.crop)
        return tuple(  # type: ignore[return-value]
            painter.render(name, cams, False, canvas, style) for name in ("overlay", "heatmap")
        )

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(draw, range(threads)))


def test_the_lane_draws_on_a_stream_of_its_own(lane) -> None:  # type: ignore[no-untyped-def]
    from app.pipeline.lanes.cuda import StreamPainter

    assert isinstance(lane.painter, StreamPainter)
    assert lane.painter.stream != torch.cuda.default_stream(lane.device)
    assert lane.painter.stream != lane.stream


def test_the_drawing_stream_draws_what_the_default_stream_draws(lane, spec) -> None:  # type: ignore[no-untyped-def]
    from app.pipeline.lanes.drawing import TensorPainter

    upload = Upload("p.jpg", encoded(photo((640, 480)), "JPEG"))
    cams = torch.rand(8, 8, generator=torch.Generator().manual_seed(2)).cuda()
    [want] = _pictures(spec, lane, TensorPainter(), upload, cams)
    # Eight threads on the one drawing stream while the default stream is kept busy.
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy / 4096
    got = _pictures(spec, lane, lane.painter, upload, cams, threads=8)
    assert got == [want] * 8  # nvJPEG is deterministic: the same bytes
