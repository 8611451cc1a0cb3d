"""/models, /predict and /explain for a detector and a segmenter (random torchvision models),
and the 400s of what cannot be explained."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.http.app import create_app
from app.pipeline.tasks.base import TaskPipeline
from app.settings import Settings
from tests.conftest import assert_error, files, image_bytes, wait_ready
from tests.fixtures_models import build_tiny, write_model
from tests.fixtures_tasks import DETECTORS, write_task_model
from tests.http.routes.test_jobs import finished, wait_for

WIDTH, HEIGHT = 96, 64


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("tasks-store")
    torch.manual_seed(0)
    # max_side 48: the model sees the 96x64 upload at 48x32, and answers in the upload's pixels.
    write_task_model(
        store,
        "det",
        "fcos_resnet50_fpn",
        "detection",
        kwargs=DETECTORS["fcos_resnet50_fpn"],
        extra="[detection]\nscore_threshold = 0.0\nmax_detections = 4\nmax_side = 48\n",
    )
    write_task_model(store, "seg", "lraspp_mobilenet_v3_large", "segmentation")
    write_model(
        store,
        "tiny",
        build_tiny(),
        architecture="tests.fixtures_models:build_tiny",
        num_classes=3,
        input_size=32,
        target_layers=["features"],
    )
    return store


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    settings = Settings(model_store=store, default_model="det", device="cpu")
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="module")
def cached(store: Path) -> Iterator[TestClient]:
    """The same models with the explanation cache on (the tests' default is off)."""
    settings = Settings(model_store=store, default_model="det", device="cpu", cache_mb=8)
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def _image() -> list[tuple[str, tuple[str, bytes, str]]]:
    return files(image_bytes((WIDTH, HEIGHT), seed=3))


def test_models_show_the_task(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert {name: m["task"] for name, m in models.items()} == {
        "det": "detection",
        "seg": "segmentation",
        "tiny": "classification",
    }
    assert client.get("/models/det").json()["target_layers"] == ["backbone.body.layer4"]


def test_predict_detection_boxes_in_upload_pixels_best_first(client: TestClient) -> None:
    response = client.post("/predict", files=_image(), data={"model": "det"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["predictions"] == [] and result["segments"] is None
    found = result["detections"]
    assert 1 <= len(found) <= 4
    scores = [d["score"] for d in found]
    assert scores == sorted(scores, reverse=True)
    for detection in found:
        x0, y0, x1, y1 = detection["box"]
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT
        assert detection["label"] == ["background", "thing1", "thing2"][detection["class_idx"]]
    # The model saw a 48x32 input: boxes come back scaled by 2 (some reach past 48 or 32).
    assert max(max(d["box"][0], d["box"][2]) for d in found) > 0


def test_explain_boxes_carry_box_label_score(client: TestClient) -> None:
    predicted = client.post("/predict", files=_image(), data={"model": "det"}).json()
    found = predicted["results"][0]["detections"]
    response = client.post(
        "/explain",
        files=_image(),
        data={"model": "det", "box": ["1", "0"], "output": "overlay,raw", "image_format": "png"},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["detections"] == found
    explained = result["explanations"]
    assert [e["detection"] for e in explained] == [1, 0]
    for item in explained:
        expected = found[item["detection"]]
        assert (item["box"], item["label"], item["score"]) == (
            expected["box"],
            expected["label"],
            expected["score"],
        )
        overlay = Image.open(io.BytesIO(base64.b64decode(item["maps"][0]["overlay"])))
        assert overlay.size == (WIDTH, HEIGHT)
        assert item["maps"][0]["raw"]["shape"][0] >= 1


def test_explain_all_boxes(client: TestClient) -> None:
    response = client.post("/explain", files=_image(), data={"model": "det", "box": "all"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert [e["detection"] for e in result["explanations"]] == list(
        range(len(result["detections"]))
    )


@pytest.mark.parametrize("model", ["det", "seg"])
def test_one_forward_gives_the_answer_and_every_gradient_methods_maps(
    client: TestClient, model: str
) -> None:
    # The detections (segments) come from the first method's hooked forward, which every
    # gradient method records: one forward for two of them, whatever the boxes; a method with
    # forwards of its own (D-RISE) hooks one of its own.
    data = {"model": model, "output": "raw", **({"box": "all"} if model == "det" else {})}

    def explain(methods: str, **extra: str) -> dict[str, Any]:
        response = client.post(
            "/explain", files=_image(), data={**data, "method": methods, **extra}
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    alone = {m: explain(m) for m in ("LayerCAM", "GradCAM")}
    both = explain("LayerCAM,GradCAM")
    assert [a["timings"]["forwards"] for a in alone.values()] == [1, 1]
    assert both["timings"]["forwards"] == 1
    result = both["results"][0]
    for method, answer in alone.items():
        one = answer["results"][0]
        assert one.get("detections") == result.get("detections")
        assert one.get("segments") == result.get("segments")
        mine = [e for e in result["explanations"] if e["method"] == method]
        assert [e["maps"] for e in mine] == [e["maps"] for e in one["explanations"]]
    if model == "det":  # the answer's forward, then D-RISE's hooked one and 40 masks in 2 chunks
        assert explain("LayerCAM,DRISE", masks="40")["timings"]["forwards"] == 4


def test_the_overlay_draws_the_explained_box(client: TestClient) -> None:
    data = {"model": "det", "box": "0", "image_format": "png", "alpha": "1"}
    response = client.post("/explain", files=_image(), data=data)
    item = response.json()["results"][0]["explanations"][0]
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["maps"][0]["overlay"]))))
    plain = np.asarray(Image.open(io.BytesIO(image_bytes((WIDTH, HEIGHT), seed=3))))
    changed = np.argwhere((overlay != plain).any(axis=2))
    x0, y0, x1, y1 = item["box"]
    # alpha=1 shows the image alone: only the outline and its caption differ, near the box.
    assert len(changed)
    assert changed[:, 1].min() >= int(x0) - 1 and changed[:, 1].max() <= max(x1, x0 + 60)
    assert changed[:, 0].max() <= int(y1) + 1


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"box": "99"}, "box 99 is past the detections"),
        ({"box": "x"}, "box must be a detection's index"),
        ({"method": "ScoreCAM"}, "ScoreCAM cannot explain a detection model"),
        ({"region": "mask"}, "region is for segmentation models"),
        ({"class_idx": "1"}, "class_idx does not apply to a detector"),
        ({"top_classes": "2"}, "top_classes is for classifiers and segmenters; 'det' is a"),
        ({"classes": "1,2"}, "Leave classes out and pick what to explain with box (box=all"),
    ],
)
def test_detection_bad_input_is_a_400(client: TestClient, data: dict[str, str], words: str) -> None:
    response = client.post("/explain", files=_image(), data={"model": "det", **data})
    assert words in assert_error(response, 400, "invalid_target")


def test_a_png_answer_holds_one_box_or_class(client: TestClient) -> None:
    """``Accept: image/png`` answers one overlay: ``box=all``, several boxes or a segmenter's
    several classes are a 406 (the first overlay was answered alone before, silently)."""
    png = {"Accept": "image/png"}
    for data in ({"model": "det", "box": "all"}, {"model": "det", "box": ["0", "1"]}):
        response = client.post("/explain", files=_image(), data=data, headers=png)
        assert "box asks for several" in assert_error(response, 406, "not_acceptable")
    data = {"model": "det", "box": "1"}
    response = client.post("/explain", files=_image(), data=data, headers=png)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    data = {"model": "seg", "top_classes": "2"}
    response = client.post("/explain", files=_image(), data=data, headers=png)
    assert "top_classes asks for several" in assert_error(response, 406, "not_acceptable")


def test_box_on_a_classifier_is_a_400(client: TestClient) -> None:
    response = client.post("/explain", files=_image(), data={"model": "tiny", "box": "0"})
    assert "box is for detection models" in assert_error(response, 400, "invalid_target")
    response = client.post("/predict", files=_image(), data={"model": "tiny", "output": "mask"})
    assert "output=mask is for segmentation" in assert_error(response, 400, "invalid_target")


def test_predict_segmentation_segments_and_mask(client: TestClient) -> None:
    response = client.post("/predict", files=_image(), data={"model": "seg", "output": "mask"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask"]))))
    assert mask.shape == (HEIGHT, WIDTH)
    segments = result["segments"]
    assert sum(s["pixels"] for s in segments) == WIDTH * HEIGHT
    for segment in segments:
        assert segment["pixels"] == int((mask == segment["class_idx"]).sum())
        rows, cols = np.nonzero(mask == segment["class_idx"])
        assert segment["box"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def _mask_png(width: int, height: int) -> str:
    picture = np.zeros((height, width), dtype=np.uint8)
    picture[4:20, 8:40] = 255
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return "png:" + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("region", "kind", "box"),
    [
        ("box:8,4,40,20", "box", [8.0, 4.0, 40.0, 20.0]),
        (None, "mask", None),
        ("png", "png", [8.0, 4.0, 40.0, 20.0]),
    ],
)
def test_explain_segmentation_regions(
    client: TestClient, region: str | None, kind: str, box: list[float] | None
) -> None:
    predicted = client.post("/predict", files=_image(), data={"model": "seg"}).json()
    top = predicted["results"][0]["segments"][0]
    data = {"model": "seg", "class_idx": str(top["class_idx"]), "method": "GradCAM,EigenCAM"}
    if region is not None:
        data["region"] = _mask_png(WIDTH, HEIGHT) if region == "png" else region
    response = client.post("/explain", files=_image(), data=data)
    assert response.status_code == 200, response.text
    explained = response.json()["results"][0]["explanations"]
    assert [e["method"] for e in explained] == ["GradCAM", "EigenCAM"]
    for item in explained:
        assert item["region"] == kind and item["class_idx"] == top["class_idx"]
        assert item["box"] == (box or [float(v) for v in top["box"]])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"region": "box:0,0,200,20"}, "is not inside"),
        ({"region": "box:1,2,3"}, "four numbers"),
        ({"region": "circle"}, "region must be 'mask'"),
        ({"region": "png:" + base64.b64encode(b"nope").decode()}, "must hold a base64 PNG"),
        ({"box": "0"}, "box is for detection models"),
    ],
)
def test_segmentation_bad_input_is_a_400(
    client: TestClient, data: dict[str, str], words: str
) -> None:
    response = client.post("/explain", files=_image(), data={"model": "seg", **data})
    assert words in assert_error(response, 400, "invalid_target")


def test_a_segmenter_explains_several_classes_each_over_its_region(client: TestClient) -> None:
    """``classes`` and ``top_classes`` choose several classes of a segmenter's image, each
    over its own mask (or the one box), refused as a classifier's are when they clash or
    exceed the model's classes."""
    predicted = client.post("/predict", files=_image(), data={"model": "seg"}).json()
    present = [s["class_idx"] for s in predicted["results"][0]["segments"]]
    others = [c for c in present if c != 0] or present
    response = client.post("/explain", files=_image(), data={"model": "seg", "top_classes": "2"})
    assert response.status_code == 200, response.text
    explained = response.json()["results"][0]["explanations"]
    assert [e["class_idx"] for e in explained] == others[:2]
    # A box region takes any class, present or not: each explains its logits there.
    data = {"model": "seg", "classes": "2,0", "region": "box:0,0,48,32", "output": "raw"}
    response = client.post("/explain", files=_image(), data=data)
    assert response.status_code == 200, response.text
    explained = response.json()["results"][0]["explanations"]
    assert [e["class_idx"] for e in explained] == [2, 0]
    assert explained[0]["maps"][0]["raw"] != explained[1]["maps"][0]["raw"]
    assert all(e["region"] == "box" and e["box"] == [0.0, 0.0, 48.0, 32.0] for e in explained)
    clash = {"model": "seg", "classes": "1", "class_idx": "1"}
    response = client.post("/explain", files=_image(), data=clash)
    assert "choose the classes one way" in assert_error(response, 400, "malformed_parameter")
    response = client.post("/explain", files=_image(), data={"model": "seg", "classes": "1,1"})
    assert "names a class twice" in assert_error(response, 400, "malformed_parameter")
    response = client.post("/explain", files=_image(), data={"model": "seg", "classes": "9"})
    assert "out of range: model 'seg' has 3" in assert_error(response, 400, "malformed_parameter")
    # A class the image lacks (the random segmenter labels this image one class) has no mask.
    absent = [c for c in range(3) if c not in present]
    data = {"model": "seg", "classes": f"{present[0]},{absent[0]}"}
    response = client.post("/explain", files=_image(), data=data)
    assert "is predicted nowhere" in assert_error(response, 400, "invalid_target")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_region_png_that_decodes_huge_or_truncated_is_a_400(client: TestClient) -> None:
    """A hostile region: a 48 kB PNG declaring 20000 x 20000 pixels is refused from its header
    (it was a 500: Pillow's bomb error escaped), one of 10000 x 10000 too, without decoding
    its pixels; a truncated mask of the right size is a 400 naming the form."""
    for side, words in ((20000, "declares far more pixels"), (10000, "region mask is 10000x10000")):
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
        assert len(buffer.getvalue()) < 64 * 1024
        region = "png:" + base64.b64encode(buffer.getvalue()).decode()
        data = {"model": "seg", "class_idx": "1", "region": region}
        response = client.post("/explain", files=_image(), data=data)
        assert words in assert_error(response, 400, "invalid_target")
    whole = base64.b64decode(_mask_png(WIDTH, HEIGHT)[len("png:") :])
    truncated = "png:" + base64.b64encode(whole[: len(whole) // 2]).decode()
    data = {"model": "seg", "class_idx": "1", "region": truncated}
    response = client.post("/explain", files=_image(), data=data)
    assert "must hold a base64 PNG" in assert_error(response, 400, "invalid_target")


def test_a_mask_of_the_wrong_size_is_a_400(client: TestClient) -> None:
    data = {"model": "seg", "class_idx": "1", "region": _mask_png(WIDTH // 2, HEIGHT)}
    response = client.post("/explain", files=_image(), data=data)
    message = assert_error(response, 400, "invalid_target")
    assert f"region mask is {WIDTH // 2}x{HEIGHT} but" in message


def test_a_job_explains_a_box(client: TestClient, tmp_path: Path) -> None:
    created = client.post("/jobs", files=_image(), data={"model": "det", "box": "0"})
    assert created.status_code == 202, created.text
    view = wait_for(client, created.json()["id"], finished)
    assert view["status"] == "succeeded", view
    assert view["result"]["results"][0]["explanations"][0]["detection"] == 0


def test_kserve_and_oip_answer_boxes(client: TestClient) -> None:
    b64 = base64.b64encode(image_bytes((WIDTH, HEIGHT), seed=3)).decode()
    response = client.post("/v1/models/det:predict", json={"instances": [{"image": {"b64": b64}}]})
    assert response.status_code == 200, response.text
    found = response.json()["predictions"][0]["detections"]
    assert found
    body = {"instances": [{"image": {"b64": b64}, "box": "1"}]}
    response = client.post("/v1/models/det:explain", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["explanations"][0]["explanations"][0]["detection"] == 1
    inputs = [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]
    response = client.post("/v2/models/det/infer", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    shown = {o["name"]: o for o in response.json()["outputs"]}
    assert list(shown) == ["boxes", "scores", "labels"]
    assert shown["boxes"]["shape"] == [len(found), 4]
    assert shown["boxes"]["data"] == [v for d in found for v in d["box"]]
    assert shown["labels"]["data"] == [d["label"] for d in found]


def test_kserve_explains_a_segmenters_region(client: TestClient) -> None:
    b64 = base64.b64encode(image_bytes((WIDTH, HEIGHT), seed=3)).decode()
    response = client.post("/v1/models/seg:predict", json={"instances": [{"image": {"b64": b64}}]})
    assert response.status_code == 200, response.text
    segments = response.json()["predictions"][0]["segments"]
    assert segments and sum(s["pixels"] for s in segments) == WIDTH * HEIGHT
    body = {
        "instances": [
            {"image": {"b64": b64}, "class_idx": 1, "region": "box:0,0,40,30", "output": "raw"}
        ]
    }
    response = client.post("/v1/models/seg:explain", json=body)
    assert response.status_code == 200, response.text
    explanation = response.json()["explanations"][0]["explanations"][0]
    assert (explanation["class_idx"], explanation["region"]) == (1, "box")
    assert explanation["box"] == [0, 0, 40, 30]
    assert explanation["maps"][-1]["raw"]["values"]
    body["instances"][0]["region"] = "box:0,0,400,30"
    response = client.post("/v1/models/seg:explain", json=body)
    assert response.status_code == 400, response.text
    assert "is not inside" in response.json()["error"]


def test_kserve_takes_box_as_a_json_list_of_integers(client: TestClient) -> None:
    b64 = base64.b64encode(image_bytes((WIDTH, HEIGHT), seed=3)).decode()
    body = {"instances": [{"image": {"b64": b64}, "box": [1, 0]}]}
    response = client.post("/v1/models/det:explain", json=body)
    assert response.status_code == 200, response.text
    explained = response.json()["explanations"][0]["explanations"]
    assert [e["detection"] for e in explained] == [1, 0]


@pytest.mark.parametrize(
    ("model", "data"),
    [
        ("det", {"box": "1"}),
        ("seg", {"class_idx": "1", "region": "box:0,0,48,32"}),
    ],
)
def test_a_repeated_task_explanation_is_answered_from_the_cache(
    cached: TestClient, monkeypatch: pytest.MonkeyPatch, model: str, data: dict[str, str]
) -> None:
    """A detector's or segmenter's answer is kept like a classifier's: the same image and
    parameters again are a hit that runs no pass and answers the same boxes, regions and maps;
    another box or region misses; D-RISE (random) is kept only with a seed."""
    passes: list[int] = []
    original = TaskPipeline.explain_images

    def counted(self: TaskPipeline, *args: Any) -> Any:
        passes.append(1)
        return original(self, *args)

    monkeypatch.setattr(TaskPipeline, "explain_images", counted)
    upload = files(image_bytes((WIDTH, HEIGHT), seed=41))  # an image no other test sends
    asked = {"model": model, "output": "raw", **data}

    def explain(**more: str) -> Any:
        response = cached.post("/explain", files=upload, data={**asked, **more})
        assert response.status_code == 200, response.text
        return response

    first = explain()
    assert first.headers["X-Camserve-Cache"] == "miss" and len(passes) == 1
    again = explain()
    assert again.headers["X-Camserve-Cache"] == "hit" and len(passes) == 1
    assert again.json()["results"] == first.json()["results"]
    assert again.json()["timings"]["cache"] == "hit"
    other = {"box": "0"} if model == "det" else {"region": "box:0,0,24,32"}
    assert explain(**other).headers["X-Camserve-Cache"] == "miss" and len(passes) == 2
    if model == "det":
        drise = {"method": "DRISE", "masks": "8"}
        assert explain(**drise).headers["X-Camserve-Cache"] == "bypass"
        assert explain(**drise).headers["X-Camserve-Cache"] == "bypass"
        seeded = {**drise, "seed": "3"}
        assert explain(**seeded).headers["X-Camserve-Cache"] == "miss"
        assert explain(**seeded).headers["X-Camserve-Cache"] == "hit"
        assert len(passes) == 5  # 1 + the other box + 2 unseeded + 1 seeded
