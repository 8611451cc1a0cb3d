"""/predict: one batched forward, top-k with labels, logits and probabilities."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error, files, image_bytes


def test_predict_one(client: TestClient) -> None:
    response = client.post("/predict", files=files(image_bytes()), data={"top_k": "2"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny"
    result = body["results"][0]
    assert (result["width"], result["height"]) == (40, 32)
    assert len(result["predictions"]) == 2
    probabilities = [p["probability"] for p in result["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert result["predictions"][0]["label"].startswith("tiny_class")
    assert set(body["timings"]) == {
        "decode_ms",
        "queue_ms",
        "forward_ms",
        "total_ms",
        "batch_images",
    }


def test_batch_equals_single_requests(client: TestClient) -> None:
    images = [image_bytes(seed=s) for s in range(3)]
    batch = client.post("/predict", files=files(*images), data={"model": "resnet"}).json()
    for i, data in enumerate(images):
        single = client.post("/predict", files=files(data), data={"model": "resnet"}).json()
        for a, b in zip(
            single["results"][0]["predictions"],
            batch["results"][i]["predictions"],
            strict=True,
        ):
            assert a["class_idx"] == b["class_idx"]
            assert a["logit"] == pytest.approx(b["logit"], abs=1e-4)


def test_top_k_is_capped_by_classes(client: TestClient) -> None:
    body = client.post("/predict", files=files(image_bytes()), data={"top_k": "50"}).json()
    assert len(body["results"][0]["predictions"]) == 3


def test_predict_errors(client: TestClient) -> None:
    assert_error(client.post("/predict", data={"top_k": "1"}), 422, "validation_error")
    assert_error(
        client.post("/predict", files=files(image_bytes()), data={"model": "nope"}),
        404,
        "model_not_found",
    )
    assert_error(
        client.post("/predict", files=files(image_bytes()), data={"top_k": "0"}),
        422,
        "validation_error",
    )


def test_the_pixels_of_a_request_are_bounded_from_the_headers(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_request_pixels=100_000, decode_budget_bytes=1024**2)
    three = files(*[image_bytes((200, 200), seed=i) for i in range(3)])
    message = assert_error(client.post("/predict", files=three), 413, "image_too_large")
    assert "120000 pixels" in message and "CAMSERVE_MAX_REQUEST_PIXELS" in message
    assert client.post("/predict", files=three[:2]).status_code == 200
    # One image whose decoding needs more memory than the whole budget (1 MiB).
    big = files(image_bytes((300, 300), mode="RGBA"))  # 16 bytes a pixel at the peak
    message = assert_error(client.post("/predict", files=big), 413, "image_too_large")
    assert "CAMSERVE_DECODE_BUDGET_BYTES" in message


def _part(filename: str, data: bytes) -> bytes:
    return (
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename.encode()
        + b'"\r\nContent-Type: image/png\r\n\r\n'
        + data
        + b"\r\n"
    )


@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_a_multipart_body_cut_short_is_refused_not_answered_in_part(
    client: TestClient, route: str
) -> None:
    # A Content-Length short of the body (or a chunked body ended early) cut the second file:
    # the form parser dropped it in silence, and the first was answered 200 alone.
    first, second = _part("a.png", image_bytes(seed=1)), _part("b.png", image_bytes(seed=2))
    whole = first + second + b"--b0undary--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    answer = client.post(route, content=whole, headers=headers)
    assert [r["filename"] for r in answer.json()["results"]] == ["a.png", "b.png"]
    for cut in (len(first) + 100, len(whole) - len(b"--b0undary--\r\n"), len(first)):
        message = assert_error(
            client.post(route, content=whole[:cut], headers=headers), 400, "bad_request"
        )
        assert "closing boundary" in message and "cut short" in message


@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_a_file_sent_as_text_is_told_how_to_attach_it(client: TestClient, route: str) -> None:
    # curl -F 'file=<star.png' (not @) sends the bytes as a text part: the message was
    # "Value error, Expected UploadFile, received: <class 'str'>".
    form = {"file": "\x89PNG not attached"}
    message = assert_error(client.post(route, data=form), 422, "validation_error")
    assert "a text field, not a file" in message and "file=@" in message
    assert "class" not in message
