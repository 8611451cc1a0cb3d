"""``Client`` and ``AsyncClient``: the service from Python, without multipart forms, base64,
retry loops or job polling by hand.

    from camserve import Client
    with Client("http://127.0.0.1:8000") as client:
        explained = client.explain("cat.jpg", methods=["GradCAM"])
        explained.overlay.save("cat-gradcam.png")

Answers are the service's own pydantic models (``app.pipeline.results``, ``app.http.schemas``).
A 503 that carries ``Retry-After`` is retried after the time it asks for (bounded), and so are
connection failures: always when nothing was sent, and for idempotent calls (GET, DELETE) also
when the connection broke mid-call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from pydantic import BaseModel

from app.http.schemas import JobCreated, ModelDetail, ModelList
from app.pipeline.results import ExplainResponse, JobProgress, JobView, PredictResponse
from camserve.answers import Explained
from camserve.errors import ServiceError, Unreachable
from camserve.images import ImageInput, as_upload
from camserve.request import ExplainRequest

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "CAMSERVE_URL"
API_KEY_ENV = "CAMSERVE_API_KEY"
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# The service refuses a request on its headers (a wrong key, a drain) and closes the connection
# without reading the body: a client still sending it may see the connection reset instead of
# the answer. After a broken upload, this idempotent call asks again, to report that refusal.
_PROBE = "/models"
_FINAL = frozenset({"succeeded", "failed", "cancelled"})
#: The service sends a comment every 15 s on a quiet event stream: 4 missed ones mean it is gone.
_EVENTS_TIMEOUT = httpx.Timeout(30.0, read=60.0)

M = TypeVar("M", bound=BaseModel)
ProgressHandler = Callable[[JobProgress], None]
Files = list[tuple[str, tuple[str, bytes, str]]]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying a call again."""

    attempts: int = 4
    """Tries in all, the first one included."""
    backoff_s: float = 0.5
    """The first wait when the service names none; each further wait doubles it."""
    max_wait_s: float = 10.0
    """No wait is longer, whatever Retry-After asks for."""

    def wait_s(self, attempt: int, retry_after: str | None = None) -> float:
        wait = self.backoff_s * float(2**attempt)
        if retry_after is not None:
            try:
                wait = max(0.0, float(retry_after))
            except ValueError:
                pass  # an HTTP date: keep the backoff
        return min(wait, self.max_wait_s)


def _retryable_status(response: httpx.Response) -> bool:
    return response.status_code == 503 and "retry-after" in response.headers


def _retryable_failure(method: str, error: httpx.TransportError) -> bool:
    # A refused connection sent nothing; a broken one may have: only idempotent calls go again.
    return isinstance(error, httpx.ConnectError) or method in _IDEMPOTENT


def raise_for_error(response: httpx.Response) -> None:
    """``ServiceError`` with the service's code and message for any answer that is not 2xx."""
    if response.is_success:
        return
    request_id = response.headers.get("x-request-id")
    try:
        error = response.json()["error"]
        code, message, details = error["code"], error["message"], error.get("details")
    except (ValueError, KeyError, TypeError):
        code, details = f"http_{response.status_code}", None
        message = response.text.strip()[:300] or response.reason_phrase
    raise ServiceError(response.status_code, code, message, details, request_id)


def _parse(response: httpx.Response, model: type[M]) -> M:
    raise_for_error(response)
    return model.model_validate_json(response.content)


def _files(images: Iterable[ImageInput]) -> Files:
    parts = []
    for number, image in enumerate(images):
        name, data = as_upload(image, None if not isinstance(image, bytes) else f"image{number}")
        parts.append(("file", (name, data, "application/octet-stream")))
    return parts


def _form(fields: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    form: dict[str, list[str]] = {}
    for name, value in fields:
        form.setdefault(name, []).append(value)
    return form


def _request(
    methods: Sequence[str] | str | None,
    model: str | None,
    class_idx: int | Sequence[int] | None,
    target_layers: Sequence[str] | str | None,
    outputs: Sequence[str],
    image_format: str | None,
    size: str | int | None,
    options: dict[str, Any],
) -> ExplainRequest:
    base = ExplainRequest()
    return ExplainRequest(
        methods=(methods,) if isinstance(methods, str) else tuple(methods or ()),
        model=model,
        class_idx=(class_idx,) if isinstance(class_idx, int) else tuple(class_idx or ()),
        target_layers=(
            (target_layers,) if isinstance(target_layers, str) else tuple(target_layers or ())
        ),
        outputs=tuple(outputs),
        image_format=image_format or base.image_format,
        size=None if size is None else str(size),
        fields=options,
    )


def _job_event(event: ServerSentEvent, progress: ProgressHandler | None) -> JobView | None:
    """The final view from a job's event stream; progress events go to ``progress``."""
    if event.event == "progress":
        if progress is not None:
            progress(JobProgress.model_validate(json.loads(event.data)["progress"]))
        return None
    if event.event in _FINAL:
        return JobView.model_validate_json(event.data)
    return None


def _outcome(view: JobView) -> Explained:
    if view.status == "succeeded" and view.result is not None:
        return Explained(view.result)
    error = view.error
    code = error.code if error else view.status
    raise ServiceError(None, code, error.message if error else f"the job {view.status}")


class _Settings:
    """What both clients share: the address, the headers and the retry policy."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        request_id: str | None,
        retry: RetryPolicy,
    ) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.request_id = request_id
        self.retry = retry

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        if request_id or self.request_id:
            headers["X-Request-ID"] = request_id or self.request_id or ""
        return headers


class Client:
    """A synchronous client of one camserve service; use it as a context manager.

    ``url`` defaults to CAMSERVE_URL, then http://127.0.0.1:8000; ``api_key`` to
    CAMSERVE_API_KEY; ``request_id`` is sent as X-Request-ID with every call unless a call
    names its own."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        request_id: str | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(url, api_key, request_id, retry)
        self.url = self._settings.url
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(
        self, method: str, path: str, request_id: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        retry = self._settings.retry
        headers = self._settings.headers(request_id)
        for attempt in range(retry.attempts):
            last = attempt == retry.attempts - 1
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as error:
                if last or not _retryable_failure(method, error):
                    if method not in _IDEMPOTENT and not isinstance(error, httpx.ConnectError):
                        with contextlib.suppress(httpx.TransportError):
                            raise_for_error(self._http.get(_PROBE, headers=headers))
                    raise Unreachable(self.url, str(error) or type(error).__name__) from None
                time.sleep(retry.wait_s(attempt))
                continue
            if last or not _retryable_status(response):
                return response
            time.sleep(retry.wait_s(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def models(self) -> ModelList:
        """Every model of the store with its status."""
        return _parse(self._call("GET", "/models"), ModelList)

    def model(self, name: str) -> ModelDetail:
        """One model: labels, layers, the methods that apply and their options."""
        return _parse(self._call("GET", f"/models/{name}"), ModelDetail)

    def predict(
        self,
        images: ImageInput | list[ImageInput],
        *,
        model: str | None = None,
        top_k: int = 5,
        request_id: str | None = None,
    ) -> PredictResponse:
        """Top-k classes of one image or of a list of them."""
        files = _files(images if isinstance(images, list) else [images])
        data = _form([("top_k", str(top_k))] + ([("model", model)] if model else []))
        response = self._call("POST", "/predict", request_id, files=files, data=data)
        return _parse(response, PredictResponse)

    def explain(
        self,
        image: ImageInput,
        methods: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
        class_idx: int | Sequence[int] | None = None,
        target_layers: Sequence[str] | str | None = None,
        outputs: Sequence[str] = ("overlay", "raw"),
        image_format: str | None = None,
        size: str | int | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Explained:
        """Predictions and maps of one image. ``options`` are any other field of /explain
        (``colormap``, ``alpha``, ``top_k``, ``normalized``) or method option (``num_samples``)."""
        request = _request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return self.send(image, request, request_id)

    def send(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> Explained:
        """``explain`` for a request already built (what the command line does)."""
        files, data = _files([image]), _form(request.form())
        response = self._call("POST", "/explain", request_id, files=files, data=data)
        return Explained(_parse(response, ExplainResponse))

    def submit_job(
        self,
        image: ImageInput,
        methods: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
        class_idx: int | Sequence[int] | None = None,
        target_layers: Sequence[str] | str | None = None,
        outputs: Sequence[str] = ("overlay", "raw"),
        image_format: str | None = None,
        size: str | int | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Job:
        """Start the explanation of ``image`` as a background job (same arguments as
        ``explain``); ``.wait()`` for its result."""
        request = _request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return self.submit(image, request, request_id)

    def submit(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> Job:
        """``submit_job`` for a request already built."""
        files, data = _files([image]), _form(request.form())
        created = _parse(
            self._call("POST", "/jobs", request_id, files=files, data=data), JobCreated
        )
        return Job(self, created.id)

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted earlier."""
        return Job(self, job_id)


class Job:
    """A background explanation on the service: ``wait`` for it, ``status`` or ``cancel`` it."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobView:
        """The job's state now (with its result once it succeeded)."""
        return _parse(self.client._call("GET", f"/jobs/{self.id}"), JobView)

    def cancel(self) -> JobView:
        """Stop the job (a finished one is forgotten)."""
        return _parse(self.client._call("DELETE", f"/jobs/{self.id}"), JobView)

    def wait(self, progress: ProgressHandler | None = None) -> Explained:
        """Follow the job's events until it ends; ``progress`` hears every progress report.
        Returns its result, or raises ``ServiceError`` with the job's error."""
        settings = self.client._settings
        for attempt in range(settings.retry.attempts):
            try:
                with connect_sse(
                    self.client._http,
                    "GET",
                    f"/jobs/{self.id}/events",
                    headers=settings.headers(),
                    timeout=_EVENTS_TIMEOUT,
                ) as source:
                    if not source.response.is_success:
                        source.response.read()
                        raise_for_error(source.response)
                    for event in source.iter_sse():
                        view = _job_event(event, progress)
                        if view is not None:
                            return _outcome(view)
            except httpx.TransportError as error:
                if attempt == settings.retry.attempts - 1:
                    raise Unreachable(self.client.url, str(error) or type(error).__name__) from None
                time.sleep(settings.retry.wait_s(attempt))
        return _outcome(self.status())  # the stream kept ending early: ask once more


class AsyncClient:
    """``Client`` for asyncio: the same calls, awaited; use it as an async context manager."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        request_id: str | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(url, api_key, request_id, retry)
        self.url = self._settings.url
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self, method: str, path: str, request_id: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        retry = self._settings.retry
        headers = self._settings.headers(request_id)
        for attempt in range(retry.attempts):
            last = attempt == retry.attempts - 1
            try:
                response = await self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as error:
                if last or not _retryable_failure(method, error):
                    if method not in _IDEMPOTENT and not isinstance(error, httpx.ConnectError):
                        with contextlib.suppress(httpx.TransportError):
                            raise_for_error(await self._http.get(_PROBE, headers=headers))
                    raise Unreachable(self.url, str(error) or type(error).__name__) from None
                await asyncio.sleep(retry.wait_s(attempt))
                continue
            if last or not _retryable_status(response):
                return response
            await asyncio.sleep(retry.wait_s(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def models(self) -> ModelList:
        return _parse(await self._call("GET", "/models"), ModelList)

    async def model(self, name: str) -> ModelDetail:
        return _parse(await self._call("GET", f"/models/{name}"), ModelDetail)

    async def predict(
        self,
        images: ImageInput | list[ImageInput],
        *,
        model: str | None = None,
        top_k: int = 5,
        request_id: str | None = None,
    ) -> PredictResponse:
        files = _files(images if isinstance(images, list) else [images])
        data = _form([("top_k", str(top_k))] + ([("model", model)] if model else []))
        response = await self._call("POST", "/predict", request_id, files=files, data=data)
        return _parse(response, PredictResponse)

    async def explain(
        self,
        image: ImageInput,
        methods: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
        class_idx: int | Sequence[int] | None = None,
        target_layers: Sequence[str] | str | None = None,
        outputs: Sequence[str] = ("overlay", "raw"),
        image_format: str | None = None,
        size: str | int | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Explained:
        request = _request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return await self.send(image, request, request_id)

    async def send(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> Explained:
        files, data = _files([image]), _form(request.form())
        response = await self._call("POST", "/explain", request_id, files=files, data=data)
        return Explained(_parse(response, ExplainResponse))

    async def submit_job(
        self,
        image: ImageInput,
        methods: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
        class_idx: int | Sequence[int] | None = None,
        target_layers: Sequence[str] | str | None = None,
        outputs: Sequence[str] = ("overlay", "raw"),
        image_format: str | None = None,
        size: str | int | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> AsyncJob:
        request = _request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return await self.submit(image, request, request_id)

    async def submit(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> AsyncJob:
        files, data = _files([image]), _form(request.form())
        response = await self._call("POST", "/jobs", request_id, files=files, data=data)
        return AsyncJob(self, _parse(response, JobCreated).id)

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)


class AsyncJob:
    """``Job`` for ``AsyncClient``."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> JobView:
        return _parse(await self.client._call("GET", f"/jobs/{self.id}"), JobView)

    async def cancel(self) -> JobView:
        return _parse(await self.client._call("DELETE", f"/jobs/{self.id}"), JobView)

    async def wait(self, progress: ProgressHandler | None = None) -> Explained:
        settings = self.client._settings
        for attempt in range(settings.retry.attempts):
            try:
                async with aconnect_sse(
                    self.client._http,
                    "GET",
                    f"/jobs/{self.id}/events",
                    headers=settings.headers(),
                    timeout=_EVENTS_TIMEOUT,
                ) as source:
                    if not source.response.is_success:
                        await source.response.aread()
                        raise_for_error(source.response)
                    async for event in source.aiter_sse():
                        view = _job_event(event, progress)
                        if view is not None:
                            return _outcome(view)
            except httpx.TransportError as error:
                if attempt == settings.retry.attempts - 1:
                    raise Unreachable(self.client.url, str(error) or type(error).__name__) from None
                await asyncio.sleep(settings.retry.wait_s(attempt))
        return _outcome(await self.status())


__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Job",
    "RetryPolicy",
]
