"""Application factory: ``create_app(settings)`` builds the service; the lifespan starts it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from app import __version__
from app.device import describe_device, resolve_device
from app.errors import install_error_handlers
from app.explainer import Explainer
from app.jobs import JobLimiter
from app.logs import configure_logging
from app.middleware import BodyLimitMiddleware
from app.registry import ModelRegistry
from app.routes import explain, health, models, predict
from app.routes.docs import install_docs
from app.routes.ui import install_ui
from app.settings import ConfigurationError, Settings, load_settings

logger = logging.getLogger(__name__)

DESCRIPTION = """
Predictions and class activation maps (CAM, Grad-CAM, Score-CAM and relatives) for the
PyTorch image classifiers of a model store. Errors are always
`{"error": {"code": ..., "message": ...}}`.
"""
_FORM_OVERHEAD = 64 * 1024  # room for the form fields and part headers


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Decide the device, discover the store, and load the models in the background."""
    settings: Settings = app.state.settings
    if not logging.getLogger().handlers:  # started by `uvicorn --factory`, not `python -m app`
        configure_logging(settings.log_level, settings.log_format, take_over_uvicorn=False)
    try:
        device = resolve_device(settings.device)
    except ConfigurationError as error:
        logger.critical("cannot start: %s", error)
        raise
    logger.info("camserve %s on device %s", __version__, describe_device(device))
    registry = ModelRegistry(settings.model_store, device, settings.default_model)
    registry.discover()
    limiter = JobLimiter(settings.max_concurrent_jobs, settings.queue_size)
    # Every torch call of the service (loading, warm-up, passes) runs on these threads. Each
    # thread that runs torch ops gets its own OpenMP team, and two teams on a CPU slow each other
    # down: resnet50's forward took 79 ms instead of 68 ms once a second thread had run one.
    model_threads = ThreadPoolExecutor(
        max_workers=settings.max_concurrent_jobs, thread_name_prefix="camserve-model"
    )
    app.state.device = device
    app.state.registry = registry
    explainer = Explainer(
        registry,
        limiter,
        settings.max_image_pixels,
        settings.max_cam_forwards,
        max_output_side=settings.max_output_side,
        max_batch_size=settings.max_batch_size,
        batch_timeout_s=settings.batch_timeout_ms / 1000,
        model_threads=model_threads,
    )
    app.state.explainer = explainer
    # Loading in a worker thread lets /health answer (and /ready say 503) while models load.
    loading = asyncio.get_running_loop().run_in_executor(model_threads, registry.load_all)
    try:
        yield
    finally:
        await explainer.close()
        await loading
        model_threads.shutdown(wait=True)


def _document_open_access(app: FastAPI) -> None:
    """Without CAMSERVE_API_KEY no route asks for a key: say so in the OpenAPI schema too, so that
    clients and generated SDKs do not send (or demand) an X-API-Key header."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.pop("security", None)
            schema.get("components", {}).pop("securitySchemes", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI application; settings come from the environment when not given."""
    settings = settings or load_settings()
    app = FastAPI(
        title="camserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app.routes.docs serves them with local assets
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    for router in (health.router, models.router, predict.router, explain.router):
        app.include_router(router)
    install_docs(app)
    if settings.ui:
        install_ui(app)
    if settings.api_key is None:
        _document_open_access(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes * settings.max_images + _FORM_OVERHEAD,
    )
    # Added last, so outermost: even a 413 from the body limit carries the CORS headers.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type", "Accept"],
            expose_headers=[
                "Retry-After",
                "X-Camserve-Method",
                "X-Camserve-Class",
                "X-Camserve-Label",
            ],
        )
    return app
