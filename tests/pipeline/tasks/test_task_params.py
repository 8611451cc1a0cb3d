"""box and region go through the one parameter rule: integers or their text, comma lists,
repeated fields, JSON lists; a value of another type is malformed."""

from __future__ import annotations

import pytest

from app.errors import MalformedParameter
from app.pipeline.params import PARAMETERS, build_params, read_text
from camserve._wire import build_request


@pytest.mark.parametrize(
    ("values", "boxes"),
    [
        ({"box": [0, 1]}, ("0", "1")),
        ({"box": 2}, ("2",)),
        ({"box": "all"}, ("all",)),
        (read_text({"box": ["1", "2,3"]}), ("1", "2", "3")),
        ({}, ()),
    ],
)
def test_box_is_read_from_every_wire_shape(values: dict[str, object], boxes: tuple) -> None:
    assert build_params(values).boxes == boxes


def test_a_box_of_another_type_is_malformed() -> None:
    with pytest.raises(MalformedParameter, match="box must be indices or 'all'"):
        build_params({"box": True})
    with pytest.raises(MalformedParameter, match="region must be a string"):
        build_params({"region": 3})


def test_the_client_sends_box_and_region() -> None:
    request = build_request(
        None, "det", None, None, ("overlay",), None, None, {"box": [0, 1], "region": "mask"}
    )
    assert ("box", "0,1") in request.form()
    params = request.params()
    assert (params.boxes, params.region) == (("0", "1"), "mask")


def test_the_schemas_document_box_and_region() -> None:
    assert "anyOf" in PARAMETERS["box"].json_schema()
    assert PARAMETERS["region"].json_schema()["type"] == "string"
