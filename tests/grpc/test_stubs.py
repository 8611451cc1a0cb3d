"""The committed descriptor set is what ``make grpc-stubs`` makes from the proto, and its
messages live beside tritonclient's in one process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import tritonclient.grpc  # noqa: F401  # registers package `inference` in the default pool
from tritonclient.grpc import service_pb2

from app.grpc import messages

ROOT = Path(__file__).resolve().parents[2]


def _tool():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("grpc_stubs", ROOT / "tools" / "grpc_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_descriptor_set_is_current(tmp_path: Path) -> None:
    written = _tool().generate(tmp_path)
    assert written.read_bytes() == messages.DESCRIPTOR_SET.read_bytes(), (
        "app/grpc/proto/grpc_predict_v2.binpb is stale: run `make grpc-stubs` and commit it"
    )


def test_every_rpc_of_the_proto_has_its_messages() -> None:
    assert set(messages.methods()) == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }


def _shape(descriptor):  # type: ignore[no-untyped-def]
    """A message's wire contract: each field's name, number, type and repetition, nested
    messages (map entries included) and oneofs."""
    return (
        sorted((f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields),
        sorted((n.name, _shape(n)) for n in descriptor.nested_types),
        sorted((o.name, sorted(f.name for f in o.fields)) for o in descriptor.oneofs),
    )


def test_the_repository_messages_are_tritons_on_the_wire() -> None:
    """The repository RPCs are Triton's (not in KServe's proto): ours must match what
    tritonclient.grpc sends and reads, field for field."""
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
        method = theirs.methods_by_name[name]
        request, response = messages.methods()[name]
        assert _shape(request.DESCRIPTOR) == _shape(method.input_type), name
        assert _shape(response.DESCRIPTOR) == _shape(method.output_type), name


def test_our_messages_and_tritonclients_share_the_wire_format() -> None:
    ours = messages.ModelInferRequest(model_name="tiny", id="7", raw_input_contents=[b"\x01"])
    ours.inputs.add(name="image", datatype="BYTES", shape=[1])
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.id, theirs.inputs[0].name) == ("tiny", "7", "image")
    assert list(theirs.raw_input_contents) == [b"\x01"]
