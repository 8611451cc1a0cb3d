"""Faithfulness over gRPC (tritonclient): the cam output's parameters carry the scores of
/explain; an unknown metric and ROAD are refused with the allowed values or the way to /jobs."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.grpc.conftest import KEYED, Served
from tests.grpc.test_infer import IMAGES, image_input, native


def _cam(triton: grpcclient.InferenceServerClient, **parameters: object):  # type: ignore[no-untyped-def]
    outputs = [grpcclient.InferRequestedOutput("cam")]
    return triton.infer(
        "tiny",
        [image_input(*IMAGES)],
        outputs=outputs,
        parameters={"method": "GradCAM", **parameters},
        headers=KEYED,
    )


def test_the_cam_output_carries_the_scores_of_explain(
    triton: grpcclient.InferenceServerClient, served: Served
) -> None:
    result = _cam(triton, faithfulness="deletion,insertion", faithfulness_steps=8)
    [output] = result.get_response().outputs
    parameters = output.parameters
    assert parameters["faithfulness_steps"].int64_param == 8
    explained = native(
        served,
        "/explain",
        method="GradCAM",
        output="raw",
        faithfulness="deletion,insertion",
        faithfulness_steps="8",
    )
    for name in ("deletion_auc", "insertion_auc"):
        got = [float(v) for v in parameters[name].string_param.split(",")]
        expected = [
            r["explanations"][0]["maps"][-1]["faithfulness"][name] for r in explained["results"]
        ]
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"faithfulness": "deletion,comprehensiveness"}, "deletion, insertion, confidence, road"),
        ({"faithfulness": "road"}, "/jobs"),
    ],
)
def test_bad_faithfulness_is_refused(
    triton: grpcclient.InferenceServerClient, parameters: dict, words: str
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        _cam(triton, **parameters)
    assert words in refused.value.message()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
