"""/models lists the store (broken ones with their reason); /models/{name} describes one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error, files, image_bytes
from tests.models.store_helpers import put_tiny


def test_list_models(client: TestClient) -> None:
    body = client.get("/models").json()
    assert body["default_model"] == "tiny"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"broken", "resnet", "tiny", "vgg"}
    assert by_name["tiny"]["status"] == "ready"
    assert by_name["tiny"]["input_shape"] == [3, 32, 32]
    assert by_name["broken"]["status"] == "failed"
    assert "weights is required" in by_name["broken"]["error"]


def test_model_detail(client: TestClient) -> None:
    body = client.get("/models/resnet").json()
    assert body["device"] == "cpu"
    assert body["labels"] == [f"resnet_class{i}" for i in range(5)]
    assert body["target_layers"] == ["layer3"]
    assert {"layer1", "layer4"} <= set(body["candidate_layers"])
    assert body["input_shape"] == [3, 64, 64]
    assert body["default_method"] == "GradCAM"
    assert "GradCAM" in body["methods"] and "CAM" not in body["methods"]
    assert "layer4" in body["not_applicable"]["CAM"]
    assert body["preprocess"] == {
        "resize": 64,
        "crop": [64, 64],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }


def test_cam_applies_only_where_a_head_resolves(client: TestClient) -> None:
    assert "CAM" in client.get("/models/tiny").json()["methods"]
    vgg = client.get("/models/vgg").json()
    assert "CAM" not in vgg["methods"]
    assert "Linear" in vgg["not_applicable"]["CAM"]


def test_unknown_model_is_404_listing_models(client: TestClient) -> None:
    response = client.get("/models/tiy")
    message = assert_error(response, 404, "model_not_found")
    assert message.index("tiny") < message.index("broken")
    assert response.json()["error"]["details"]["available"][0] == "tiny"


def test_broken_model_detail_is_503_with_reason(client: TestClient) -> None:
    message = assert_error(client.get("/models/broken"), 503, "model_unavailable")
    assert "weights is required" in message


def test_api_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key="s3cret")
    assert_error(client.get("/models"), 401, "unauthorized")
    response = client.get("/models", headers={"X-API-Key": "wrong"})
    assert_error(response, 401, "unauthorized")
    assert client.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes stay open
    assert client.get("/ready").status_code == 200


def test_cors(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=["http://app.test"])
    response = client.options(
        "/explain",
        headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST"},
    )
    assert response.headers["access-control-allow-origin"] == "http://app.test"
    other = client.get("/health", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_headers_on_body_limit_errors(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=["http://app.test"], max_upload_bytes=1024, max_images=1)
    response = client.post(
        "/explain",
        content=b"x" * 200_000,
        headers={"Origin": "http://app.test", "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 413
    assert response.headers["access-control-allow-origin"] == "http://app.test"


def test_model_detail_lists_each_methods_declared_options(client: TestClient) -> None:
    from app.cam import METHODS

    body = client.get("/models/tiny").json()
    options = body["method_options"]
    assert set(options) == set(body["methods"])
    assert [o["name"] for o in options["GradCAM"]] == ["eigen_smooth", "aug_smooth"]
    assert options["SSCAM"] == [
        {
            "name": o.name,
            "type": o.describe()["type"],
            "default": o.default,
            "minimum": o.low,
            "maximum": o.high,
            "help": o.help,
            "choices": list(o.choices) or None,
        }
        for o in METHODS["SSCAM"].options
    ]
    assert [o["name"] for o in options["FinerCAM"]] == [
        "gamma",
        "num_references",
        "comparison_idx",
        "eigen_smooth",
        "aug_smooth",
    ]
    (aug,) = [o for o in options["EigenCAM"] if o["name"] != "fc_layer"]
    assert aug["name"] == "aug_smooth" and aug["type"] == "boolean" and aug["default"] is False
    assert "fc_layer" not in str(options["CAM"])  # from the manifest, not the request


def test_model_detail_describes_each_method_and_marks_the_slow_ones(client: TestClient) -> None:
    """Summary and cost come from the declarations: the docstring's first line and the budget's
    forward count (one image, the default layers and options); the threshold is published."""
    body = client.get("/models/tiny").json()
    info = body["method_info"]
    assert set(info) == set(body["methods"])
    assert info["GradCAM"] == {
        "summary": "Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391).",
        "forwards": 0,
        "slow": False,
    }
    channels = body["layer_shapes"][body["target_layers"][0]][0]
    assert info["ScoreCAM"]["forwards"] == channels  # one masked input per channel
    assert info["SSCAM"]["forwards"] == channels * 35  # and per sample (its default)
    assert info["SmoothGradCAMpp"]["forwards"] == 4  # noisy copies, whatever the layer
    assert body["slow_forwards"] == 1
    slow = {m for m, i in info.items() if i["slow"]}
    assert slow == {"ScoreCAM", "SSCAM", "ISCAM", "AblationCAM", "SmoothGradCAMpp"}
    assert set(body["layer_shapes"]) == set(body["candidate_layers"])


def test_openapi_form_fields_come_from_the_declarations(client: TestClient) -> None:
    from app.cam import METHODS

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    body = next(s for name, s in schemas.items() if "explain" in name)["properties"]
    declared = {o.name for cls in METHODS.values() for o in cls.options if o.public}
    assert declared <= set(body)
    assert body["num_samples"]["maximum"] == 64 and body["num_samples"]["minimum"] == 1
    assert "SSCAM (35)" in body["num_samples"]["description"]
    assert body["gamma"]["type"] == "number" and "FinerCAM" in body["gamma"]["description"]
    assert body["comparison_idx"]["type"] == "array"


def test_the_version_field_picks_a_version_on_every_model_route(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    from tests.http.routes.test_jobs import finished, submit, wait_for
    from tests.models.store_helpers import put_tiny

    put_tiny(tmp_path, "tiny", seed=0, version=1)
    put_tiny(tmp_path, "tiny", seed=1, version=2, policy="[version_policy]\nall = true")
    client = make_client(model_store=tmp_path)
    image = files(image_bytes())
    for version in (1, 2):
        form = {"version": str(version), "output": "raw"}
        explained = client.post("/explain", files=image, data=form).json()
        assert explained["version"] == version
        predicted = client.post("/predict", files=image, data={"version": str(version)}).json()
        assert predicted["version"] == version
        job = wait_for(client, submit(client, image_bytes(), **form)["id"], finished)
        assert job["result"]["version"] == version
        assert client.get("/models/tiny", params={"version": version}).json()["version"] == version
    assert client.post("/predict", files=image).json()["version"] == 2
    assert_error(
        client.post("/predict", files=image, data={"version": "3"}), 404, "model_not_found"
    )
    assert_error(
        client.post("/predict", files=image, data={"version": "0"}), 422, "validation_error"
    )


def test_the_new_methods_and_a_string_options_choices_reach_the_page(client: TestClient) -> None:
    """The page lists /models/{name}'s methods and options: the methods of issue #28 are there,
    and IS-CAM's schedule names its choices."""
    body = client.get("/models/tiny").json()
    assert {"FullGrad", "ShapleyCAM", "KPCACAM", "FEM", "RandomCAM"} <= set(body["methods"])
    (schedule,) = [o for o in body["method_options"]["ISCAM"] if o["name"] == "schedule"]
    assert schedule["type"] == "string" and schedule["default"] == "cumulative"
    assert schedule["choices"] == ["cumulative", "linear"]
    assert body["method_info"]["FullGrad"]["summary"].startswith("FullGrad (Srinivas & Fleuret")
    assert not body["method_info"]["FullGrad"]["slow"]


def test_a_folder_whose_name_is_not_utf8_is_skipped_not_a_500(
    make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder named with bytes that are not UTF-8 became a model whose name no JSON answer
    can carry: /models, /ready and the repository index answered 500 (a hostile review)."""
    put_tiny(tmp_path, "tiny", seed=0)
    os.mkdir(os.fsencode(tmp_path) + b"/bad\xff")
    client = make_client(model_store=tmp_path, model_control="explicit", admin_key="admin")
    assert [m["name"] for m in client.get("/models").json()["models"]] == ["tiny"]
    assert client.get("/ready").json()["models"] == {"tiny": "ready"}
    index = client.post("/v2/repository/index", headers={"X-Admin-Key": "admin"})
    assert [row["name"] for row in index.json()] == ["tiny"]
    assert "b'bad\\xff'" in caplog.text and "rename it with a UTF-8 name" in caplog.text
