"""The kserve SDK's REST client against camserve, run as its own process by test_kserve_sdk.py.

The kserve SDK and tritonclient.grpc both register the protobuf package ``inference`` in
protobuf's default pool, so the two cannot be imported in one process (pytest's): the test
runs this script with the server's URL and images on stdin, and reads its JSON on stdout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


async def calls(url: str, images: list[bytes]) -> dict[str, Any]:
    done: dict[str, Any] = {}
    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    try:
        done["v2_live"] = await v2.is_server_live(url)
        done["v2_ready"] = await v2.is_server_ready(url)
        done["v2_model_ready"] = await v2.is_model_ready(url, "resnet")
        done["v1_live"] = await v1.is_server_live(url)
        done["v1_model_ready"] = await v1.is_model_ready(url, "resnet")

        # The SDK's default for numpy data: the binary tensor data extension.
        binary = InferInput("image", [len(images)], "BYTES")
        binary.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        answer = await v2.infer(url, InferRequest("resnet", [binary]), model_name="resnet")
        done["binary_logits"] = answer.outputs[0].as_numpy().tolist()

        # JSON data: camserve reads base64 text there.
        texts = [base64.b64encode(image).decode() for image in images]
        as_json = InferInput("image", [len(images)], "BYTES", data=texts)
        request = InferRequest(
            "tiny",
            [as_json],
            parameters={"method": "GradCAM"},
            request_outputs=[RequestedOutput("logits"), RequestedOutput("cam")],
        )
        answer = await v2.infer(url, request, model_name="tiny")
        done["cam_shape"] = list(answer.outputs[1].shape)
        done["cam_method"] = answer.outputs[1].parameters["method"]
        done["cam"] = answer.outputs[1].as_numpy()[0].tolist()

        predicted = await v1.infer(
            url,
            {"instances": [{"image": {"b64": text}, "top_k": 5} for text in texts]},
            model_name="resnet",
        )
        done["v1_predictions"] = predicted["predictions"]

        errors = {}
        for name, call in (
            ("unknown_model", v2.infer(url, InferRequest("nope", [as_json]), model_name="nope")),
            (
                "unknown_parameter",
                v2.infer(
                    url,
                    InferRequest("tiny", [as_json], parameters={"temperature": 1}),
                    model_name="tiny",
                ),
            ),
            ("v1_bad_base64", v1.infer(url, {"instances": [{"image": {"b64": "!!"}}]}, "tiny")),
        ):
            try:
                await call
                errors[name] = None
            except httpx.HTTPStatusError as error:
                errors[name] = str(error)
        done["errors"] = errors
    finally:
        await v2.close()
        await v1.close()
    return done


def main() -> None:
    given = json.load(sys.stdin)
    images = [base64.b64decode(text) for text in given["images"]]
    print(json.dumps(asyncio.run(calls(given["url"], images))))


if __name__ == "__main__":
    main()
