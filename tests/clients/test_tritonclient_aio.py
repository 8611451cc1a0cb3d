"""tritonclient.http.aio (the asyncio client, which sends application/octet-stream) against a
real camserve."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.clients.conftest import IMAGES, IMAGES_B64, explain_raw, predict_logits


def with_client(
    host: str, calls: Callable[[aioclient.InferenceServerClient], Awaitable[Any]]
) -> Any:
    async def run() -> Any:
        client = aioclient.InferenceServerClient(url=host)
        try:
            return await calls(client)
        finally:
            await client.close()

    return asyncio.run(run())


def image_input(binary: bool = True) -> aioclient.InferInput:
    tensor = aioclient.InferInput("image", [len(IMAGES)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(IMAGES, dtype=np.object_))
    else:
        tensor.set_data_from_numpy(np.array(IMAGES_B64, dtype=np.object_), binary_data=False)
    return tensor


def test_metadata_and_readiness(host: str) -> None:
    async def calls(client: aioclient.InferenceServerClient) -> tuple:
        return (
            await client.is_server_live(),
            await client.is_server_ready(),
            await client.is_model_ready("tiny"),
            await client.get_server_metadata(),
            await client.get_model_metadata("tiny"),
            await client.get_model_config("tiny"),
        )

    live, ready, model_ready, server, metadata, config = with_client(host, calls)
    assert live and ready and model_ready
    assert "binary_tensor_data" in server["extensions"]
    assert metadata["outputs"][0]["shape"] == [-1, 3] and config["name"] == "tiny"


def test_infer_binary_and_json_gives_the_logits_of_predict(host: str, server: str) -> None:
    async def calls(client: aioclient.InferenceServerClient) -> tuple:
        binary = await client.infer("resnet", [image_input()])
        as_json = await client.infer(
            "resnet",
            [image_input(binary=False)],
            outputs=[aioclient.InferRequestedOutput("logits", binary_data=False)],
            request_compression_algorithm="gzip",
            response_compression_algorithm="gzip",
        )
        return binary.as_numpy("logits"), as_json.as_numpy("logits")

    binary, as_json = with_client(host, calls)
    expected = np.asarray(predict_logits(server, IMAGES, "resnet"), np.float32)
    assert np.array_equal(binary, expected) and np.array_equal(as_json, expected)


def test_the_cam_output(host: str, server: str) -> None:
    async def calls(client: aioclient.InferenceServerClient) -> Any:
        tensor = aioclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array(IMAGES[:1], dtype=np.object_))
        outputs = [
            aioclient.InferRequestedOutput("cam", binary_data=True),
        ]
        result = await client.infer(
            "tiny", [tensor], outputs=outputs, parameters={"method": "GradCAMpp"}
        )
        return result.as_numpy("cam")

    cam = with_client(host, calls)
    expected = np.asarray(explain_raw(server, IMAGES[:1], "tiny", "GradCAMpp")[0], np.float32)
    assert np.array_equal(cam[0], expected)


def test_errors_read_through_the_client(host: str) -> None:
    async def calls(client: aioclient.InferenceServerClient) -> list[str]:
        messages = []
        for call in (
            client.get_model_config("nope"),
            client.infer("tiny", [image_input()], parameters={"colour": "red"}),
        ):
            with pytest.raises(InferenceServerException) as caught:
                await call
            messages.append(str(caught.value))
        return messages

    config, unknown = with_client(host, calls)
    assert "Unknown model 'nope'" in config
    assert "no parameter 'colour'" in unknown
