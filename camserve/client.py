"""``Client`` and ``AsyncClient``: the service from Python, without multipart forms, base64,
retry loops or job polling by hand.

    from camserve import Client
    with Client("http://127.0.0.1:8000") as client:
        explained = client.explain("cat.jpg", methods=["GradCAM"])
        explained.overlay.save("cat-gradcam.png")

Answers are the service's own pydantic models (``app.pipeline.results``, ``app.http.schemas``).
A 503 or 429 that carries ``Retry-After`` is retried after the time it asks for (bounded), a job's
event stream as every other call, and so are connection failures: always when nothing was sent,
and for idempotent calls (GET, DELETE) also when the connection broke mid-call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse

from app.http.schemas import JobCreated, ModelDetail, ModelList
from app.pipeline.results import ExplainResponse, JobView, PredictResponse
from camserve._wire import (
    EVENTS_TIMEOUT,
    IDEMPOTENT,
    PROBE,
    Connection,
    ProgressHandler,
    RetryPolicy,
    build_request,
    failure_reason,
    file_parts,
    form_data,
    from_camserve,
    job_event,
    not_http,
    once_per_change,
    outcome,
    parse,
    raise_for_error,
    retry_wait_s,
    retryable_failure,
    segment,
    service_error,
)
from camserve.answers import Explained
from camserve.errors import Unreachable
from camserve.images import ImageInput
from camserve.request import ExplainRequest


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
        self._connection = Connection(url, api_key, request_id, retry)
        self.url = self._connection.url
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
        retry = self._connection.retry
        headers = self._connection.headers(request_id)
        for attempt in range(retry.attempts):
            last = attempt == retry.attempts - 1
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as error:
                if last or not retryable_failure(method, error):
                    reason = failure_reason(error)
                    if method not in IDEMPOTENT and not isinstance(error, httpx.ConnectError):
                        try:
                            probe = self._http.get(PROBE, headers=headers)
                        except httpx.TransportError as probed:
                            if not_http(probed):  # a POST's error is often a reset: say why
                                reason = failure_reason(probed)
                        else:
                            raise_for_error(from_camserve(probe, self.url))
                    raise Unreachable(self.url, reason) from None
                time.sleep(retry.wait_s(attempt))
                continue
            wait = retry_wait_s(retry, attempt, response)
            if wait is None:
                return from_camserve(response, self.url)
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def models(self) -> ModelList:
        """Every model of the store with its status."""
        return parse(self._call("GET", "/models"), ModelList)

    def model(self, name: str) -> ModelDetail:
        """One model: labels, layers, the methods that apply and their options."""
        return parse(self._call("GET", f"/models/{segment(name)}"), ModelDetail)

    def predict(
        self,
        images: ImageInput | list[ImageInput],
        *,
        model: str | None = None,
        top_k: int = 5,
        request_id: str | None = None,
    ) -> PredictResponse:
        """Top-k classes of one image or of a list of them."""
        files = file_parts(images if isinstance(images, list) else [images])
        data = form_data([("top_k", str(top_k))] + ([("model", model)] if model else []))
        response = self._call("POST", "/predict", request_id, files=files, data=data)
        return parse(response, PredictResponse)

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
        request = build_request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return self.send(image, request, request_id)

    def send(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> Explained:
        """``explain`` for a request already built (what the command line does)."""
        files, data = file_parts([image]), form_data(request.form())
        response = self._call("POST", "/explain", request_id, files=files, data=data)
        return Explained(parse(response, ExplainResponse))

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
        request = build_request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return self.submit(image, request, request_id)

    def submit(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> Job:
        """``submit_job`` for a request already built."""
        files, data = file_parts([image]), form_data(request.form())
        created = parse(self._call("POST", "/jobs", request_id, files=files, data=data), JobCreated)
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
        return parse(self.client._call("GET", f"/jobs/{segment(self.id)}"), JobView)

    def cancel(self) -> JobView:
        """Stop the job (a finished one is forgotten)."""
        return parse(self.client._call("DELETE", f"/jobs/{segment(self.id)}"), JobView)

    def wait(self, progress: ProgressHandler | None = None) -> Explained:
        """Follow the job's events until it ends; ``progress`` hears each new count once.
        Returns its result, or raises ``ServiceError`` with the job's error. A broken stream is
        opened again, and a refused one as every call is asked again (a 503 or 429 with
        Retry-After: a job store that is down, too many streams open)."""
        retry = self.client._connection.retry
        progress = once_per_change(progress)  # across reconnects too
        for attempt in range(retry.attempts):
            try:
                view, refused = self._follow(progress)
            except httpx.TransportError as error:
                if attempt == retry.attempts - 1:
                    raise Unreachable(self.client.url, failure_reason(error)) from None
                time.sleep(retry.wait_s(attempt))
                continue
            if view is not None:
                return outcome(view)
            if refused is not None:
                wait = retry_wait_s(retry, attempt, refused)
                if wait is None:
                    raise service_error(from_camserve(refused, self.client.url))
                time.sleep(wait)
        return outcome(self.status())  # the stream kept ending early: ask once more

    def _follow(
        self, progress: ProgressHandler | None
    ) -> tuple[JobView | None, httpx.Response | None]:
        """One connection to the job's event stream: the job's final view, or the answer that
        refused the stream, or neither when the stream ended early."""
        settings = self.client._connection
        with connect_sse(
            self.client._http,
            "GET",
            f"/jobs/{segment(self.id)}/events",
            headers=settings.headers(),
            timeout=EVENTS_TIMEOUT,
        ) as source:
            if not source.response.is_success:
                source.response.read()
                return None, source.response
            for event in source.iter_sse():
                view = job_event(event, progress)
                if view is not None:
                    return view, None
        return None, None


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
        self._connection = Connection(url, api_key, request_id, retry)
        self.url = self._connection.url
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
        retry = self._connection.retry
        headers = self._connection.headers(request_id)
        for attempt in range(retry.attempts):
            last = attempt == retry.attempts - 1
            try:
                response = await self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as error:
                if last or not retryable_failure(method, error):
                    reason = failure_reason(error)
                    if method not in IDEMPOTENT and not isinstance(error, httpx.ConnectError):
                        try:
                            probe = await self._http.get(PROBE, headers=headers)
                        except httpx.TransportError as probed:
                            if not_http(probed):  # a POST's error is often a reset: say why
                                reason = failure_reason(probed)
                        else:
                            raise_for_error(from_camserve(probe, self.url))
                    raise Unreachable(self.url, reason) from None
                await asyncio.sleep(retry.wait_s(attempt))
                continue
            wait = retry_wait_s(retry, attempt, response)
            if wait is None:
                return from_camserve(response, self.url)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def models(self) -> ModelList:
        return parse(await self._call("GET", "/models"), ModelList)

    async def model(self, name: str) -> ModelDetail:
        return parse(await self._call("GET", f"/models/{segment(name)}"), ModelDetail)

    async def predict(
        self,
        images: ImageInput | list[ImageInput],
        *,
        model: str | None = None,
        top_k: int = 5,
        request_id: str | None = None,
    ) -> PredictResponse:
        files = file_parts(images if isinstance(images, list) else [images])
        data = form_data([("top_k", str(top_k))] + ([("model", model)] if model else []))
        response = await self._call("POST", "/predict", request_id, files=files, data=data)
        return parse(response, PredictResponse)

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
        request = build_request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return await self.send(image, request, request_id)

    async def send(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> Explained:
        files, data = file_parts([image]), form_data(request.form())
        response = await self._call("POST", "/explain", request_id, files=files, data=data)
        return Explained(parse(response, ExplainResponse))

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
        request = build_request(
            methods, model, class_idx, target_layers, outputs, image_format, size, options
        )
        return await self.submit(image, request, request_id)

    async def submit(
        self, image: ImageInput, request: ExplainRequest, request_id: str | None = None
    ) -> AsyncJob:
        files, data = file_parts([image]), form_data(request.form())
        response = await self._call("POST", "/jobs", request_id, files=files, data=data)
        return AsyncJob(self, parse(response, JobCreated).id)

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
        return parse(await self.client._call("GET", f"/jobs/{segment(self.id)}"), JobView)

    async def cancel(self) -> JobView:
        return parse(await self.client._call("DELETE", f"/jobs/{segment(self.id)}"), JobView)

    async def wait(self, progress: ProgressHandler | None = None) -> Explained:
        retry = self.client._connection.retry
        progress = once_per_change(progress)
        for attempt in range(retry.attempts):
            try:
                view, refused = await self._follow(progress)
            except httpx.TransportError as error:
                if attempt == retry.attempts - 1:
                    raise Unreachable(self.client.url, failure_reason(error)) from None
                await asyncio.sleep(retry.wait_s(attempt))
                continue
            if view is not None:
                return outcome(view)
            if refused is not None:
                wait = retry_wait_s(retry, attempt, refused)
                if wait is None:
                    raise service_error(from_camserve(refused, self.client.url))
                await asyncio.sleep(wait)
        return outcome(await self.status())

    async def _follow(
        self, progress: ProgressHandler | None
    ) -> tuple[JobView | None, httpx.Response | None]:
        settings = self.client._connection
        async with aconnect_sse(
            self.client._http,
            "GET",
            f"/jobs/{segment(self.id)}/events",
            headers=settings.headers(),
            timeout=EVENTS_TIMEOUT,
        ) as source:
            if not source.response.is_success:
                await source.response.aread()
                return None, source.response
            async for event in source.aiter_sse():
                view = job_event(event, progress)
                if view is not None:
                    return view, None
        return None, None


__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Job",
    "RetryPolicy",
]
