"""ModelInfer: protobuf <-> the OIP codec (placeholder until the codec lands)."""

from __future__ import annotations

from typing import Any

from app.errors import BadRequest


async def infer(service: Any, request: Any, time_left: float | None) -> Any:
    raise BadRequest("not yet")
