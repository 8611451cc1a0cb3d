"""The explain form: its fields are in the schema, and FastAPI reads none of them itself."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.http.routes.forms import explain_field_schemas, takes_explain_form
from app.http.routing import api_routes
from app.pipeline.params import PARAMETERS


def test_the_explain_bodies_list_every_parameter_after_the_routes_own_fields(
    make_client: Callable[..., TestClient],
) -> None:
    schemas = make_client().get("/openapi.json").json()["components"]["schemas"]
    for name in ("Body_explain_images_explain_post", "Body_create_job_jobs_post"):
        fields = list(schemas[name]["properties"])
        assert fields == ["version", "file", "model", *PARAMETERS]
    predict = schemas["Body_predict_images_predict_post"]["properties"]
    assert list(predict) == ["file", "model", "top_k", "version", "output"]
    assert list(explain_field_schemas()) == list(PARAMETERS)


def test_no_explain_parameter_is_a_body_field_that_fastapi_reads_at_each_request(
    make_client: Callable[..., TestClient],
) -> None:
    # Declared to FastAPI, the 35 fields were looked up and validated one by one at every
    # request (2 ms of the event loop's CPU); app.pipeline.params reads them instead.
    explaining = [r for r in api_routes(make_client().app.routes) if takes_explain_form(r)]
    assert sorted(r.path for r in explaining) == ["/explain", "/jobs"]
    for route in explaining:
        assert isinstance(route, APIRoute) and route.body_field is not None
        read = route.body_field.field_info.annotation.model_fields
        assert set(read) == {"file", "model", "version"}
