"""What ``Client`` and ``AsyncClient`` share: where the service is and which headers it gets,
when a call is tried again, how an error answer or a job's event reads, how a request becomes a
multipart form."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from httpx_sse import ServerSentEvent
from pydantic import BaseModel

from app.pipeline.results import JobProgress, JobView
from camserve.answers import Explained
from camserve.errors import ServiceError
from camserve.images import ImageInput, as_upload
from camserve.request import ExplainRequest

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "CAMSERVE_URL"
API_KEY_ENV = "CAMSERVE_API_KEY"
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# The service refuses a request on its headers (a wrong key, a drain) and reads and drops up to
# 16 MiB of its body, so that a client still sending sees the answer. A larger upload (or one cut
# by the body limit) may still see the connection reset instead: after a broken upload, this
# idempotent call asks again, to report that refusal.
PROBE = "/models"
FINAL = frozenset({"succeeded", "failed", "cancelled"})
#: The service sends a comment every 15 s on a quiet event stream: 4 missed ones mean it is gone.
EVENTS_TIMEOUT = httpx.Timeout(30.0, read=60.0)

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


def retryable_status(response: httpx.Response) -> bool:
    """A refusal that names when to come back: a full queue or a job store that is down (503),
    too many job event streams open (429)."""
    return response.status_code in (429, 503) and "retry-after" in response.headers


def retry_wait_s(retry: RetryPolicy, attempt: int, response: httpx.Response) -> float | None:
    """How long to wait before asking again after ``response`` to try number ``attempt`` (from
    0); None when it is the answer to keep: a success, an error that asking again does not
    change, or the last try's. The one rule of every call, a job's event stream included."""
    if attempt >= retry.attempts - 1 or not retryable_status(response):
        return None
    return retry.wait_s(attempt, response.headers.get("retry-after"))


def not_http(error: httpx.TransportError) -> bool:
    """Whether ``error`` is an answer that is not HTTP/1.1 (what camserve's gRPC port sends an
    HTTP client), rather than a connection that broke."""
    return isinstance(error, httpx.RemoteProtocolError) and "disconnected" not in str(error)


def failure_reason(error: httpx.TransportError) -> str:
    """What ``Unreachable`` says of ``error``; an answer that is not HTTP/1.1 names the likely
    mix-up of ports."""
    reason = str(error) or type(error).__name__
    if not_http(error):
        reason += (
            " (what listens there does not answer HTTP/1.1: a gRPC port? camserve serves HTTP on "
            "CAMSERVE_PORT, 8000 by default, and gRPC on CAMSERVE_GRPC_PORT, 8001)"
        )
    return reason


def retryable_failure(method: str, error: httpx.TransportError) -> bool:
    # A refused connection sent nothing; a broken one may have: only idempotent calls go again.
    return isinstance(error, httpx.ConnectError) or method in IDEMPOTENT


def service_url(url: str, source: str = "the service URL") -> str:
    """``url`` without its trailing slash; ``ValueError`` unless it is an http(s) URL with a
    host (``localhost:8000`` would otherwise read as the scheme ``localhost``)."""
    try:
        parts = urlsplit(url.strip())
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a malformed address, such as an unclosed [IPv6
        valid = False
    if valid:
        return url.strip().rstrip("/")
    example = f"http://{url.strip()}" if "://" not in url else DEFAULT_URL
    raise ValueError(
        f"{source} {url!r} is not an http:// or https:// URL with a host; write it in full, "
        f"e.g. {example}"
    )


def segment(value: str) -> str:
    """``value`` as one segment of a URL path: a model name or a job id can neither leave its
    place (``../etc``) nor end the path (``?``, ``#``)."""
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _error_fields(response: httpx.Response) -> tuple[str, str, Any] | None:
    """The code, message and details of an answer in camserve's error shape, else None."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"]), error.get("details")
    except (ValueError, KeyError, TypeError):
        return None


def raise_for_error(response: httpx.Response) -> None:
    """``ServiceError`` with the service's code and message for any answer that is not 2xx."""
    if not response.is_success:
        raise service_error(response)


def service_error(response: httpx.Response) -> ServiceError:
    """The ``ServiceError`` that an error answer reads as."""
    request_id = response.headers.get("x-request-id")
    found = _error_fields(response)
    if found is None:
        code, details = f"http_{response.status_code}", None
        message = response.text.strip()[:300] or response.reason_phrase
    else:
        code, message, details = found
    return ServiceError(response.status_code, code, message, details, request_id)


def from_camserve(response: httpx.Response, url: str) -> httpx.Response:
    """``response``, unless it is a 404 that camserve did not write (a route of another server,
    or of a camserve server's other protocols under a path such as /v2): then ``ServiceError``
    ``not_camserve``, which says that ``url`` is not a camserve server's root."""
    if response.status_code != 404 or _error_fields(response) is not None:
        return response
    parts = urlsplit(url)
    root = f"{parts.scheme}://{parts.netloc}"
    answered = response.text.strip()[:120] or response.reason_phrase
    hint = (
        f"point the URL (--url, CAMSERVE_URL or Client(url)) at the server's root, e.g. {root}"
        if root != url
        else "is a camserve server (`camserve serve`) listening there?"
    )
    raise ServiceError(
        404,
        "not_camserve",
        f"{url} does not look like the root of a camserve server: {response.request.method} "
        f"{response.request.url.path} answered 404 ({answered}); {hint}",
        request_id=response.headers.get("x-request-id"),
    )


def parse(response: httpx.Response, model: type[M]) -> M:
    raise_for_error(response)
    return model.model_validate_json(response.content)


def file_parts(images: Iterable[ImageInput]) -> Files:
    parts = []
    for number, image in enumerate(images):
        name, data = as_upload(image, None if not isinstance(image, bytes) else f"image{number}")
        parts.append(("file", (name, data, "application/octet-stream")))
    return parts


def form_data(fields: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    form: dict[str, list[str]] = {}
    for name, value in fields:
        form.setdefault(name, []).append(value)
    return form


def build_request(
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


def once_per_change(progress: ProgressHandler | None) -> ProgressHandler | None:
    """``progress``, called only when the count (done, total) differs from the last one it
    heard: the stream repeats a count when only the job's status changes (queued, then running
    at 0/0), and the final event repeats the last count."""
    if progress is None:
        return None
    last: list[tuple[int, int]] = []

    def changed(report: JobProgress) -> None:
        count = (report.done, report.total)
        if last and last[0] == count:
            return
        last[:] = [count]
        progress(report)

    return changed


def job_event(event: ServerSentEvent, progress: ProgressHandler | None) -> JobView | None:
    """The final view from a job's event stream; progress events, and the final count, go to
    ``progress``."""
    if event.event == "progress":
        if progress is not None:
            progress(JobProgress.model_validate(json.loads(event.data)["progress"]))
        return None
    if event.event in FINAL:
        view = JobView.model_validate_json(event.data)
        if progress is not None:
            # The last count too: a job that ended before the stream was read (a short one)
            # sends its final event only, and a progress bar still ends where the job did.
            progress(view.progress)
        return view
    return None


def outcome(view: JobView) -> Explained:
    if view.status == "succeeded" and view.result is not None:
        return Explained(view.result)
    error = view.error
    code = error.code if error else view.status
    raise ServiceError(None, code, error.message if error else f"the job {view.status}")


class Connection:
    """What both clients share: the address, the headers and the retry policy."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        request_id: str | None,
        retry: RetryPolicy,
    ) -> None:
        given = url or os.environ.get(URL_ENV)
        source = "the service URL" if url or not given else URL_ENV
        self.url = service_url(given or DEFAULT_URL, source)
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
