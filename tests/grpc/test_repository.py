"""The model-repository RPCs (Triton's RepositoryIndex, RepositoryModelLoad and
RepositoryModelUnload) through tritonclient.grpc against real servers: one with the repository
API on (``admin_served``), one without an admin key (``served``)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import image_bytes
from tests.grpc.conftest import ADMIN, Served


def refused(call: Any) -> tuple[str, str]:
    """The status code and ``str()`` of the client's exception (what a user prints)."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), str(caught.value)


def index(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str, str]]:
    return {
        m.name: (m.version, m.state, m.reason)
        for m in client.get_model_repository_index(headers=ADMIN).models
    }


def test_the_index_lists_every_model_with_its_state(
    admin_triton: grpcclient.InferenceServerClient,
) -> None:
    rows = index(admin_triton)
    assert rows["tiny"] == ("1", "READY", "")
    assert rows["broken"][1] == "UNAVAILABLE" and rows["broken"][2]
    assert {"tiny", "resnet", "vgg", "broken"} <= set(rows)


def test_the_index_of_ready_models_only(admin_served: Served) -> None:
    with grpc.insecure_channel(admin_served.target) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            service_pb2.RepositoryIndexRequest(ready=True),
            metadata=tuple(ADMIN.items()),
            timeout=10,
        )
    names = {m.name for m in answer.models}
    assert "tiny" in names and "broken" not in names
    assert {m.state for m in answer.models} == {"READY"}


def test_unload_then_load_and_infer_again(admin_triton: grpcclient.InferenceServerClient) -> None:
    infer_input = grpcclient.InferInput("image", [1], "BYTES")
    infer_input.set_data_from_numpy(np.array([image_bytes(seed=3)], dtype=object))
    before = admin_triton.infer("vgg", [infer_input]).as_numpy("logits")

    admin_triton.unload_model("vgg", headers=ADMIN)
    assert not admin_triton.is_model_ready("vgg")
    assert index(admin_triton)["vgg"][1] == "UNAVAILABLE"
    code, message = refused(lambda: admin_triton.infer("vgg", [infer_input]))
    assert code != "StatusCode.OK" and "vgg" in message

    admin_triton.load_model("vgg", headers=ADMIN)
    assert admin_triton.is_model_ready("vgg")
    assert index(admin_triton)["vgg"][1] == "READY"
    after = admin_triton.infer("vgg", [infer_input]).as_numpy("logits")
    assert after.tolist() == before.tolist()


def test_an_unload_may_say_unload_dependents(
    admin_triton: grpcclient.InferenceServerClient,
) -> None:
    admin_triton.unload_model("resnet", headers=ADMIN, unload_dependents=True)
    assert not admin_triton.is_model_ready("resnet")
    admin_triton.load_model("resnet", headers=ADMIN)
    assert admin_triton.is_model_ready("resnet")


def test_a_load_with_a_config_is_invalid_and_names_it(
    admin_triton: grpcclient.InferenceServerClient,
) -> None:
    code, message = refused(lambda: admin_triton.load_model("tiny", headers=ADMIN, config="{}"))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'config'" in message and "model.toml" in message
    assert admin_triton.is_model_ready("tiny")


def test_a_load_with_file_overrides_is_invalid(
    admin_triton: grpcclient.InferenceServerClient,
) -> None:
    code, message = refused(
        lambda: admin_triton.load_model("tiny", headers=ADMIN, files={"file:1/model.pt": b"x"})
    )
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'file:1/model.pt'" in message and "no file overrides" in message


def test_an_unknown_model_is_not_found(admin_triton: grpcclient.InferenceServerClient) -> None:
    for call in (admin_triton.load_model, admin_triton.unload_model):
        code, message = refused(lambda c=call: c("nope", headers=ADMIN))
        assert code == "StatusCode.NOT_FOUND" and "'nope'" in message


def test_a_named_repository_is_invalid(admin_served: Served) -> None:
    with grpc.insecure_channel(admin_served.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(
                service_pb2.RepositoryModelLoadRequest(repository_name="other", model_name="tiny"),
                metadata=tuple(ADMIN.items()),
                timeout=10,
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'other'" in caught.value.details() and "repository_name" in caught.value.details()


@pytest.mark.parametrize("headers", [None, {"x-admin-key": "wrong"}])
def test_a_missing_or_wrong_admin_key_is_unauthenticated(
    admin_triton: grpcclient.InferenceServerClient, headers: dict[str, str] | None
) -> None:
    for call in (
        lambda: admin_triton.get_model_repository_index(headers=headers),
        lambda: admin_triton.load_model("tiny", headers=headers),
        lambda: admin_triton.unload_model("tiny", headers=headers),
    ):
        code, message = refused(call)
        assert code == "StatusCode.UNAUTHENTICATED"
        assert "CAMSERVE_ADMIN_KEY" in message and "x-admin-key" in message
    assert admin_triton.is_model_ready("tiny")


def test_without_an_admin_key_set_the_repository_is_off(
    triton: grpcclient.InferenceServerClient,
) -> None:
    for call in (
        lambda: triton.get_model_repository_index(headers=ADMIN),
        lambda: triton.load_model("tiny", headers=ADMIN),
        lambda: triton.unload_model("tiny", headers=ADMIN),
    ):
        code, message = refused(call)
        assert code == "StatusCode.PERMISSION_DENIED"
        assert "is off" in message and "CAMSERVE_ADMIN_KEY" in message
