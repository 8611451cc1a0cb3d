"""Application factory: ``create_app(settings)`` builds the service; the lifespan starts it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app import __version__
from app.http.deps import API_KEY_HEADER, ApiKeys
from app.http.errors import PREFIXES, install_error_handlers
from app.http.middleware.access import AccessMiddleware
from app.http.middleware.allowed_hosts import AllowedHostsMiddleware, allowed_hosts
from app.http.middleware.body_limit import BodyLimitMiddleware
from app.http.middleware.compression import ProtocolCompression
from app.http.middleware.cors import Cors
from app.http.middleware.gate import GateMiddleware
from app.http.middleware.head import HeadMiddleware
from app.http.middleware.header_cap import HeaderCapMiddleware
from app.http.middleware.security_headers import SecurityHeaders
from app.http.middleware.startup import QuietRefusal, refuse_start
from app.http.openapi import form_fields_without_null, with_explain_fields
from app.http.protocols import kserve, oip, repository
from app.http.protocols.base import json_body_limit
from app.http.routes import explain, health, jobs, metrics, models, predict
from app.http.routes.docs import install_docs
from app.http.routes.jobs import StreamSlots
from app.http.routes.ui import install_ui
from app.lifecycle import THREADS_MIN_S, Lifecycle, joined_within
from app.models.control import ModelControl
from app.models.device import describe_device, resolve_device
from app.models.memory import trim_periodically
from app.models.registry import ModelRegistry
from app.observability.context import REQUEST_ID_HEADER
from app.observability.logs import configure_logging
from app.observability.metrics import Metrics
from app.pipeline.cache import CACHE_HEADER
from app.pipeline.cpu_share import CountedThreads, CpuShare
from app.pipeline.explainer import Explainer
from app.pipeline.jobs import open_job_store, share_cache
from app.pipeline.render_processes import RenderProcesses
from app.pipeline.rendering import lower_thread_priority
from app.protocols import binary
from app.settings import ConfigurationError, Settings, load_settings, warn_renamed

logger = logging.getLogger(__name__)

DESCRIPTION = """
Predictions and class activation maps (CAM, Grad-CAM, Score-CAM and relatives) for the
PyTorch image classifiers of a model store. Errors are always
`{"error": {"code": ..., "message": ...}}`.
"""
_FORM_OVERHEAD = 64 * 1024  # room for the form fields and part headers
_TRIM_EVERY_S = 10.0  # how often freed heap pages go back to the system (app.models.memory)
_GZIP_MIN_BYTES = 1024  # smaller answers go as they are (compressing would save too little)
_GZIP_LEVEL = 5  # level 9 costs three times the CPU for a few percent on JSON of floats


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Decide the device, discover the store, and load the models in the background."""
    settings: Settings = app.state.settings
    if not logging.getLogger().handlers:  # started by `uvicorn --factory`, not `python -m app`
        configure_logging(settings.log_level, settings.log_format, take_over_uvicorn=False)
    try:
        device = resolve_device(settings.device)
    except ConfigurationError as error:
        refuse_start(app.state, error)
        raise
    logger.info("camserve %s on device %s", __version__, describe_device(device))
    warn_renamed(os.environ)
    registry = ModelRegistry.from_settings(settings, device)
    registry.discover()
    # Every torch call of the service (loading, warm-up, passes) runs on these threads. Each
    # thread that runs torch ops gets its own OpenMP team, and two teams on a CPU slow each other
    # down: resnet50's forward took 79 ms instead of 68 ms once a second thread had run one.
    # Every thread below counts its tasks as CPU work in flight: a pass on the CPU takes an
    # intra-op team only as wide as the cores the rest leaves free (``app.pipeline.cpu_share``).
    share = CpuShare(fit_teams=settings.fit_pass_threads)
    model_threads = CountedThreads(
        share, max_workers=settings.max_model_slots, thread_name_prefix="camserve-model"
    )
    # Decoding and rendering get their own bounded pool: a burst of uploads waits here instead of
    # growing the event loop's default pool by a thread (and its memory arena) per request.
    image_threads = CountedThreads(
        share, max_workers=min(8, max(2, os.cpu_count() or 2)), thread_name_prefix="camserve-image"
    )
    # Drawing has a pool of its own: large pictures cannot hold up every upload's decoding, nor a
    # burst of uploads the drawing of answers whose passes already ran.
    render_threads = CountedThreads(
        share, max_workers=min(8, max(2, os.cpu_count() or 2)), thread_name_prefix="camserve-render"
    )
    # The heavy drawings draw one at a time anyway; on a thread of lower CPU priority, so that a
    # 4096-px picture does not slow the small requests' passes and pictures beside it.
    heavy_render_threads = CountedThreads(
        share,
        max_workers=1,
        thread_name_prefix="camserve-render-heavy",
        initializer=lower_thread_priority,
    )
    # Where Pillow would draw them on that thread, processes of their own draw them instead,
    # outside this process's GIL (a nice value does not reach the GIL). Started by the first
    # heavy drawing: most replicas and tests never draw one.
    render_processes = (
        RenderProcesses(settings.render_processes) if settings.render_processes else None
    )
    app.state.device = device
    app.state.registry = registry
    app.state.cpu_share = share
    explainer = Explainer.from_settings(
        settings,
        registry,
        model_threads=model_threads,
        image_threads=image_threads,
        metrics=app.state.metrics,
        render_threads=render_threads,
        heavy_render_threads=heavy_render_threads,
        render_processes=render_processes,
    )
    app.state.explainer = explainer
    app.state.control = ModelControl(
        registry, settings.model_control, settings.model_poll_s, model_threads
    )
    app.state.jobs = open_job_store(settings, explainer, app.state.lifecycle)
    share_cache(explainer.cache, app.state.jobs, settings)
    try:
        await app.state.jobs.start()
    except ConfigurationError as error:  # Redis answers, but refuses the job store
        refuse_start(app.state, error)
        raise
    # Loading in a worker thread lets /health answer (and /ready say 503) while models load.
    loading = asyncio.get_running_loop().run_in_executor(model_threads, registry.load_all)
    trimming = asyncio.create_task(trim_periodically(_TRIM_EVERY_S, image_threads))
    background = [trimming]
    if app.state.metrics is not None and app.state.metrics.shared is not None:
        # Several workers: the others' scrapes read this worker's gauges from the shared files.
        background.append(asyncio.create_task(app.state.metrics.publish_periodically()))
    if settings.model_control == "poll":
        background.append(asyncio.create_task(app.state.control.watch()))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await app.state.jobs.close()
        await explainer.close()
        within = max(THREADS_MIN_S, app.state.lifecycle.grace_left())
        if not await joined_within(within, loading, model_threads):
            loading_now = [n for n, e in registry.entries.items() if e.status == "loading"]
            logger.error(
                "the model threads are still busy %.0f s into the shutdown (models loading: "
                "%s); leaving without them (a load stuck in the file system, such as a hung "
                "network mount)",
                within,
                ", ".join(loading_now) or "none",
            )
            app.state.threads_left = True
        image_threads.shutdown(wait=True)
        render_threads.shutdown(wait=True)
        heavy_render_threads.shutdown(wait=True)
        if render_processes is not None:
            render_processes.close()


def _install_openapi(app: FastAPI, open_access: bool) -> None:
    """The schema as clients should read it: no ``null`` for form fields (a multipart field
    cannot carry one), and, without CAMSERVE_API_KEY, no route asking for a key, so that clients
    and generated SDKs do not send (or demand) an X-API-Key header."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            if open_access:
                for operations in schema.get("paths", {}).values():
                    for operation in operations.values():
                        operation.pop("security", None)
                schema.get("components", {}).pop("securitySchemes", None)
            app.openapi_schema = form_fields_without_null(with_explain_fields(schema, app.routes))
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
        docs_url=None,  # app.http.routes.docs serves them with local assets
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(app.state) if settings.metrics else None
    app.state.lifecycle = Lifecycle(settings.shutdown_grace_s)
    app.state.threads_left = False
    """Set when the lifespan ended with model threads still busy (``app.__main__`` exits)."""
    app.state.api_keys = ApiKeys.from_settings(settings)
    app.state.streams = StreamSlots(
        settings.max_event_streams, settings.max_event_streams_per_client
    )
    install_error_handlers(app)
    _include_routes(app, settings)
    _install_openapi(app, open_access=not app.state.api_keys.required)
    _add_middleware(app, settings)
    return app


def _include_routes(app: FastAPI, settings: Settings) -> None:
    """Every route of the service; the gate finds the model routes among them by itself."""
    for router in (
        health.router,
        models.router,
        predict.router,
        explain.router,
        jobs.router,
        oip.router,
        kserve.router,
        models.admin_router,
        repository.router,
    ):
        app.include_router(router)
    if settings.metrics:
        app.include_router(metrics.router)
    install_docs(app)
    if settings.ui:
        install_ui(app)  # its page at / answers KServe v1's liveness to non-browsers
    else:
        app.include_router(kserve.root_router)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """From the inside out: the protocols' answer compression, the body limit (and request
    decompression), the gate, CORS, the allowed host names, HEAD as GET, the access log and
    request id, the header caps, the browser's security headers."""
    # The protocols' answers (JSON, binary tensors) compressed for a client that accepts gzip;
    # small answers are left alone.
    app.add_middleware(
        ProtocolCompression,
        prefixes=PREFIXES,
        minimum_size=_GZIP_MIN_BYTES,
        compresslevel=_GZIP_LEVEL,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes * settings.max_images + _FORM_OVERHEAD,
        body_timeout_s=settings.body_timeout_s,
        min_rate=settings.body_min_rate,
        grace_s=settings.body_grace_s,
        budget=settings.body_budget_bytes,
        protocol_prefixes=PREFIXES,
        protocol_max_bytes=json_body_limit(
            settings.max_upload_bytes, settings.max_images, _FORM_OVERHEAD
        ),
    )
    # Outside the body limit: a request without its key, or during the drain, is refused on
    # its headers, before a byte of its body is read. It reads the app's live route list.
    app.add_middleware(
        GateMiddleware,
        routes=app.router.routes,
        api_keys=app.state.api_keys,
        lifecycle=app.state.lifecycle,
        allowed_origins=settings.cors_origins,
    )
    # Outside the body limit: even its 413 carries the CORS headers.
    if settings.cors_origins:
        app.add_middleware(
            Cors,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],  # DELETE: a page cancels its jobs
            # Every header a route reads: a job's stream is taken up again with Last-Event-ID,
            # OIP's binary bodies are framed by theirs, and a body may come compressed.
            allow_headers=[
                API_KEY_HEADER,
                "Content-Type",
                "Content-Encoding",
                "Accept",
                REQUEST_ID_HEADER,
                "Last-Event-ID",
                binary.HEADER,
            ],
            expose_headers=[
                "Retry-After",
                "Location",  # of a new job
                REQUEST_ID_HEADER,
                CACHE_HEADER,
                binary.HEADER,
                "X-Camserve-Method",
                "X-Camserve-Class",
                "X-Camserve-Label",
            ],
        )
    # A request by a name the service does not answer to (a site rebound to this machine: DNS
    # rebinding) is refused before CORS or the gate, which trust the page's name, look at it.
    hosts = allowed_hosts(settings.allowed_hosts, settings.host)
    if hosts is not None:
        app.add_middleware(AllowedHostsMiddleware, hosts=hosts)
    # HEAD on every GET route, seen by everything inside as the GET it answers like.
    app.add_middleware(HeadMiddleware)
    # Outermost of all: every answer, a CORS preflight or a 413 included, carries the id.
    app.add_middleware(AccessMiddleware, metrics=app.state.metrics)
    # Before even that: a request with too many or too large headers costs nothing more.
    app.add_middleware(
        HeaderCapMiddleware,
        max_fields=settings.max_header_fields,
        max_bytes=settings.max_header_bytes,
    )
    # Every answer, a 431 included, tells a browser it is no page to sniff, frame or run
    # scripts in (the page and the docs set a policy of their own).
    app.add_middleware(SecurityHeaders)
    # The lifespan's: a start refused for a setting is logged in one line, not a traceback.
    app.add_middleware(QuietRefusal, state=app.state)
