"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def get_metrics(request: Request) -> Response:
    """Report the service's metrics in the Prometheus text format (open like /health)."""
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
