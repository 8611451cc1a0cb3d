"""Faithfulness scores for a detector's and a segmenter's maps (the shipped, trained
``shapes-detect`` and ``shapes-segment``): every map of every box or region is scored, the scores
are the engine's curves of the answer's own map with the task's score (a detection's similarity,
a region's class probability), computed again here from the model alone; a map that points at
the object deletes it faster than its reverse; the budget and ROAD's job-only rule hold; a job
scores at the background priority and its progress counts the scoring forwards."""

from __future__ import annotations

import asyncio
import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.cam.faithfulness import auc, confidence_change, confidence_drop, perturbation_curve
from app.cam.task_targets import DetectionSimilarity, RegionProbability
from app.errors import OverBudget
from app.http.app import create_app
from app.models.loading import LoadedModel, load_model
from app.models.manifest import parse_manifest
from app.pipeline import faithfulness
from app.pipeline.batching import Batcher
from app.pipeline.decoding import Upload
from app.pipeline.params import build_params
from app.pipeline.tasks.base import TaskPipeline
from app.pipeline.tasks.common import decode_whole
from app.pipeline.tasks.detection import kept
from app.pipeline.tasks.segmentation import _to_output, region_mask, upload_labels
from app.settings import Settings
from tests.conftest import assert_error, wait_ready
from tests.fixtures_tasks import SHIPPED_STORE, copy_shapes_task_models, shapes_scene
from tests.http.routes.test_jobs import finished, wait_for

STEPS = 8


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("task-faithfulness")
    copy_shapes_task_models(store)
    settings = Settings(model_store=store, default_model="shapes-detect", device="cpu", cache_mb=0)
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def _explain(client: TestClient, model: str, scenes: list[bytes], **data: str) -> Any:
    files = [("file", (f"s{i}.png", scene, "image/png")) for i, scene in enumerate(scenes)]
    response = client.post(
        "/explain",
        files=files,
        data={
            "model": model,
            "output": "raw",
            "faithfulness": "deletion,insertion,confidence",
            "faithfulness_steps": str(STEPS),
            **data,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


def _model(name: str) -> LoadedModel:
    return load_model(parse_manifest(SHIPPED_STORE / name), torch.device("cpu"))


def _aucs(model: LoadedModel, x: torch.Tensor, raw: dict[str, Any], target: Any) -> list[float]:
    cam = torch.tensor(raw["values"], dtype=torch.float32)[None]
    found = []
    for mode in ("deletion", "insertion"):
        curve = perturbation_curve(
            model.module, x, cam, None, mode, STEPS, batch_size=None, targets=target
        )
        found.append(float(auc(*curve)[0]))
    return found


def _confidence(model: LoadedModel, x: torch.Tensor, raw: dict[str, Any], target: Any) -> Any:
    """The engine's (drop, increase) of the answer's map, with the task's score."""
    cam = torch.tensor(raw["values"], dtype=torch.float32)[None]
    before, after = confidence_change(model.module, x, cam, None, targets=target)
    return float(confidence_drop(before, after)[0]), bool(after[0] > before[0])


def test_every_box_map_is_scored_by_the_detections_similarity(client: TestClient) -> None:
    scenes = [
        shapes_scene(0),
        shapes_scene(1, size=80),
    ]  # two sizes: each image is scored on its own
    answer = _explain(client, "shapes-detect", scenes, box="all", method="GradCAM,LayerCAM")
    assert answer["timings"]["faithfulness_ms"] > 0
    model = _model("shapes-detect")
    checked = 0
    for scene, result in zip(scenes, answer["results"], strict=True):
        decoded = decode_whole(Upload("s.png", scene), model.spec, 10**6)
        x = decoded.tensor[None]
        with torch.inference_mode():
            output = model.module(x)[0]
        rows = kept(model, output)
        explanations = result["explanations"]
        assert {e["method"] for e in explanations} == {"GradCAM", "LayerCAM"}
        assert len(explanations) == 2 * len(result["detections"]) > 0
        for explanation in explanations:
            row = rows[explanation["detection"]]
            target = DetectionSimilarity.of(output, row)
            # The curve starts at the detection itself: its similarity is its score.
            assert float(target(output)) == pytest.approx(explanation["score"], abs=1e-6)
            for one in explanation["maps"]:
                scores = one["faithfulness"]
                assert scores["steps"] == STEPS
                deletion, insertion = _aucs(model, x, one["raw"], target)
                assert scores["deletion_auc"] == pytest.approx(deletion, abs=1e-5)
                assert scores["insertion_auc"] == pytest.approx(insertion, abs=1e-5)
                drop, increase = _confidence(model, x, one["raw"], target)
                assert scores["confidence_drop"] == pytest.approx(drop, abs=1e-5)
                assert scores["confidence_increase"] is increase
                assert 0.0 <= scores["deletion_auc"] <= 1.0
                assert 0.0 <= scores["insertion_auc"] <= 1.0
                checked += 1
    assert checked >= 4


def test_a_map_on_the_object_deletes_it_faster_than_its_reverse(client: TestClient) -> None:
    """The scores rank maps: the answer's map (on the object, for a trained detector) against
    the same map reversed, each scored by the engine with the same target."""
    answer = _explain(client, "shapes-detect", [shapes_scene(0)], box="0", method="GradCAM")
    explanation = answer["results"][0]["explanations"][0]
    model = _model("shapes-detect")
    decoded = decode_whole(Upload("s.png", shapes_scene(0)), model.spec, 10**6)
    x = decoded.tensor[None]
    with torch.inference_mode():
        output = model.module(x)[0]
    target = DetectionSimilarity.of(output, kept(model, output)[0])
    raw = explanation["maps"][0]["raw"]
    reversed_raw = {"values": (-torch.tensor(raw["values"])).tolist()}
    deletion, insertion = _aucs(model, x, raw, target)
    reversed_deletion, reversed_insertion = _aucs(model, x, reversed_raw, target)
    assert explanation["maps"][0]["faithfulness"]["deletion_auc"] == pytest.approx(deletion, 1e-5)
    assert deletion < reversed_deletion
    assert insertion > reversed_insertion


def test_a_region_map_is_scored_by_the_class_probability_there(client: TestClient) -> None:
    scene = shapes_scene(2)
    answer = _explain(client, "shapes-segment", [scene], method="LayerCAM")
    explanation = answer["results"][0]["explanations"][0]
    model = _model("shapes-segment")
    decoded = decode_whole(Upload("s.png", scene), model.spec, 10**6)
    x = decoded.tensor[None]
    with torch.inference_mode():
        output = model.module(x)[0]
    class_idx = explanation["class_idx"]
    mask = region_mask("mask", decoded, upload_labels(decoded, output), class_idx)
    target = RegionProbability(class_idx, _to_output(mask, tuple(output.shape[-2:])))
    assert float(target(output)) == pytest.approx(explanation["probability"], abs=1e-6)
    (one,) = explanation["maps"]
    deletion, insertion = _aucs(model, x, one["raw"], target)
    assert one["faithfulness"]["deletion_auc"] == pytest.approx(deletion, abs=1e-5)
    assert one["faithfulness"]["insertion_auc"] == pytest.approx(insertion, abs=1e-5)
    drop, increase = _confidence(model, x, one["raw"], target)
    assert one["faithfulness"]["confidence_drop"] == pytest.approx(drop, abs=1e-5)
    assert one["faithfulness"]["confidence_increase"] is increase


def test_the_scoring_forwards_count_against_the_budget(client: TestClient) -> None:
    limit = client.app.state.explainer.max_cam_forwards  # type: ignore[attr-defined]
    steps = 64
    # box=all: up to 10 boxes, 2 curves of 65 forwards each per map.
    data = {"faithfulness": "deletion,insertion", "faithfulness_steps": str(steps), "box": "all"}
    images = limit // (10 * 2 * (steps + 1)) + 1
    files = [("file", (f"s{i}.png", shapes_scene(0), "image/png")) for i in range(images)]
    response = client.post("/explain", files=files, data={"model": "shapes-detect", **data})
    message = assert_error(response, 422, "over_budget")
    assert "Scoring faithfulness (deletion, insertion)" in message


def test_road_on_a_task_runs_only_as_a_job(client: TestClient) -> None:
    files = [("file", ("s.png", shapes_scene(0), "image/png"))]
    data = {"model": "shapes-segment", "faithfulness": "road"}
    response = client.post("/explain", files=files, data=data)
    assert "runs only as a job" in assert_error(response, 400, "bad_request")
    view = _job(client, data)
    scores = view["result"]["results"][0]["explanations"][0]["maps"][0]["faithfulness"]
    assert 0.0 <= scores["road_morf"] <= 1.0 and 0.0 <= scores["road_lerf"] <= 1.0
    assert scores["road_percentiles"] == [10, 20, 30, 40, 50, 60, 70, 80, 90]


def _job(client: TestClient, data: dict[str, str]) -> Any:
    files = [("file", ("s.png", shapes_scene(0), "image/png"))]
    created = client.post("/jobs", files=files, data=data)
    assert created.status_code == 202, created.text
    view = wait_for(client, created.json()["id"], finished)
    assert view["status"] == "succeeded", view
    return view


def test_a_task_job_runs_in_the_background_class_and_counts_its_scoring(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detector's job waits behind interactive requests as a classifier's does: its CAM
    passes and its scoring pass are submitted as background work; its progress ends at the
    forwards of both (D-RISE's masks, then 2 curves of STEPS + 1)."""
    seen: list[tuple[str, bool]] = []
    submit = Batcher.submit

    async def recording(self: Batcher, *args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs.get("priority", "interactive"), bool(kwargs.get("chunked"))))
        return await submit(self, *args, **kwargs)

    monkeypatch.setattr(Batcher, "submit", recording)
    masks = 40
    data = {
        "model": "shapes-detect",
        "box": "0",
        "method": "DRISE",
        "masks": str(masks),
        "faithfulness": "deletion,insertion",
        "faithfulness_steps": str(STEPS),
    }
    view = _job(client, data)
    assert seen and all(priority == "background" for priority, _ in seen)
    assert len(seen) == 2  # the D-RISE pass, then the scoring pass
    progress = view["progress"]
    assert progress["done"] == progress["total"]
    assert progress["total"] >= masks + 2 * (STEPS + 1)


def test_oip_and_kserve_carry_the_scores_of_explain(client: TestClient) -> None:
    """OIP's ``cam`` output lists each row's scores as parameters (comma-separated, as its
    ``detection`` and ``score``); KServe's ``:explain`` answers them in every map, as /explain."""
    scene = shapes_scene(0)
    explained = _explain(client, "shapes-detect", [scene], box="all")
    rows = explained["results"][0]["explanations"]
    expected = {
        name: [e["maps"][-1]["faithfulness"][name] for e in rows]
        for name in ("deletion_auc", "insertion_auc", "confidence_drop")
    }
    increases = [e["maps"][-1]["faithfulness"]["confidence_increase"] for e in rows]
    b64 = base64.b64encode(scene).decode()
    parameters = {
        "faithfulness": "deletion,insertion,confidence",
        "faithfulness_steps": STEPS,
        "box": "all",
    }
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
        "outputs": [{"name": "cam"}],
        "parameters": parameters,
    }
    response = client.post("/v2/models/shapes-detect/infer", json=body)
    assert response.status_code == 200, response.text
    (cam,) = [o for o in response.json()["outputs"] if o["name"] == "cam"]
    shown = cam["parameters"]
    assert shown["faithfulness_steps"] == STEPS
    assert shown["detection"] == ",".join(str(e["detection"]) for e in rows)
    for name, values in expected.items():
        got = [float(v) for v in shown[name].split(",")]
        assert got == pytest.approx(values, abs=1e-6)
    assert shown["confidence_increase"] == ",".join(str(v).lower() for v in increases)
    instance = {"image": {"b64": b64}, **parameters}
    response = client.post("/v1/models/shapes-detect:explain", json={"instances": [instance]})
    assert response.status_code == 200, response.text
    answered = response.json()["explanations"][0]["explanations"]
    for name, values in expected.items():
        got = [e["maps"][-1]["faithfulness"][name] for e in answered]
        assert got == pytest.approx(values, abs=1e-6)


def test_road_is_bounded_by_the_pixels_it_imputes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROAD's imputation (on the image threads) is bounded per request, counted at the model
    input's size (an upload past ``max_side`` counts scaled down), and a job over it is refused
    when it is created, not when it runs."""
    monkeypatch.setattr(faithfulness, "ROAD_MAX_PIXELS", 64 * 64)
    big = shapes_scene(0, size=128)  # shapes-segment sees it at 64 x 64: 4096 pixels, one map
    files = [("file", ("s.png", big, "image/png"))]
    data = {"model": "shapes-segment", "faithfulness": "road"}
    created = client.post("/jobs", files=files, data=data)
    assert created.status_code in (200, 201, 202), created.text
    data["top_classes"] = "2"  # two maps: 8192 pixels
    created = client.post("/jobs", files=files, data=data)
    message = assert_error(created, 422, "over_budget")
    assert "would impute 8,192 input pixels" in message and "4,096" in message


def test_a_task_job_over_a_limit_is_refused_when_created(tmp_path: Path) -> None:
    """A detector's job reads its uploads' headers when it is created, as a classifier's does:
    an image over ``CAMSERVE_MAX_IMAGE_PIXELS``, or a drawing over the render budget
    (``box=all`` counts its most boxes), is refused then, not failed later."""
    shutil.copytree(SHIPPED_STORE / "shapes-detect", tmp_path / "shapes-detect")
    settings = Settings(
        model_store=tmp_path,
        default_model="shapes-detect",
        device="cpu",
        cache_mb=0,
        max_image_pixels=64 * 64,
        max_render_maps=2,
    )
    with TestClient(create_app(settings)) as small:
        wait_ready(small)
        files = [("file", ("s.png", shapes_scene(0, size=80), "image/png"))]
        created = small.post("/jobs", files=files, data={"model": "shapes-detect"})
        assert "80x80" in assert_error(created, 413, "image_too_large")
        files = [("file", ("s.png", shapes_scene(0), "image/png"))]
        data = {"model": "shapes-detect", "box": "all"}
        created = small.post("/jobs", files=files, data=data)
        assert "CAMSERVE_MAX_RENDER_MAPS" in assert_error(created, 422, "over_budget")
        explained = small.post("/explain", files=files, data=data)
        assert "CAMSERVE_MAX_RENDER_MAPS" in assert_error(explained, 422, "over_budget")
        created = small.post("/jobs", files=files, data={**data, "output": "raw"})
        assert created.status_code == 202, created.text  # raw maps are not drawn


def test_a_task_request_stays_admitted_through_its_scoring_and_drawing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue bound counts a detector's request until its answer is drawn, as a
    classifier's: its scoring pass and its pictures are work too (a flood of them could
    otherwise queue past the bound once their CAM passes ended)."""
    limiter = client.app.state.explainer.limiter  # type: ignore[attr-defined]
    seen: dict[str, int] = {}
    score_maps, results = faithfulness.score_maps, TaskPipeline._results

    async def scoring(*args: Any, **kwargs: Any) -> Any:
        seen["scoring"] = limiter.in_flight
        return await score_maps(*args, **kwargs)

    def drawing(self: TaskPipeline, *args: Any) -> Any:
        seen["drawing"] = limiter.in_flight
        return results(self, *args)

    monkeypatch.setattr(faithfulness, "score_maps", scoring)
    monkeypatch.setattr(TaskPipeline, "_results", drawing)
    _explain(client, "shapes-detect", [shapes_scene(0)], box="0")
    assert seen == {"scoring": 1, "drawing": 1}
    assert limiter.in_flight == 0


def test_parts_of_one_task_request_are_summed_against_the_forward_budget(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KServe instances whose options differ are checked together: a detector's masks and
    scoring forwards of every part count toward one request's budget, as a classifier's do."""
    explainer = client.app.state.explainer  # type: ignore[attr-defined]
    monkeypatch.setattr(explainer, "max_cam_forwards", 100)
    part = build_params({"method": "DRISE", "masks": 60, "seed": 1, "box": "0"})
    uploads = [Upload("s.png", shapes_scene(0))]
    asyncio.run(explainer.check_together("shapes-detect", [(uploads, part)]))
    with pytest.raises(OverBudget, match=r"120 forwards together \(120 masked or noisy"):
        asyncio.run(explainer.check_together("shapes-detect", [(uploads, part), (uploads, part)]))
    scored = build_params({"box": "0", "faithfulness": "deletion", "faithfulness_steps": 30})
    two = [(uploads, part), (uploads, scored), (uploads, scored)]
    # 60 + 2 x 31, each share named
    with pytest.raises(OverBudget, match=r"122 forwards .*60 masked .* and 62 scoring"):
        asyncio.run(explainer.check_together("shapes-detect", two))
