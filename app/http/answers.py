"""JSON answers sent a slice at a time (``app.pipeline.answers`` makes the slices)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from app.pipeline.answers import answer_parts


async def _send(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def json_answer(
    model: BaseModel, *, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> StreamingResponse:
    """``model`` as a JSON response with its ``Content-Length``, the event loop free between
    the slices of its long strings."""
    parts = await answer_parts(model)
    return StreamingResponse(
        _send(parts),
        status_code=status_code,
        headers={**(headers or {}), "content-length": str(sum(map(len, parts)))},
        media_type="application/json",
    )
