"""Liveness and readiness."""

from __future__ import annotations

import platform

import torch
import torchvision
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app import __version__
from app.http.deps import get_registry
from app.http.schemas import HealthResponse, JobStoreState, ReadyResponse
from app.models.device import describe_device
from app.models.registry import ModelRegistry

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
def get_health(request: Request, registry: ModelRegistry = Depends(get_registry)) -> HealthResponse:
    """Report that the process is alive, its device and library versions."""
    return HealthResponse(
        version=__version__,
        device=describe_device(request.app.state.device),
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        models_loaded=registry.ready,
    )


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={
        503: {
            "model": ReadyResponse,
            "description": "models are still loading, or the service drains after SIGTERM",
        }
    },
)
def get_ready(request: Request, registry: ModelRegistry = Depends(get_registry)) -> JSONResponse:
    """Answer 200 once every model has loaded (or failed); 503 before, and once draining."""
    draining = request.app.state.lifecycle.draining
    jobs = getattr(request.app.state, "jobs", None)
    store = jobs.state() if jobs is not None else None
    body = ReadyResponse(
        ready=registry.ready and not draining,
        draining=draining,
        models={name: entry.status for name, entry in registry.entries.items()},
        job_store=JobStoreState(
            backend=store.backend, available=store.available, problem=store.problem
        )
        if store
        else None,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
