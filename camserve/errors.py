"""What the client raises instead of an answer: the service's own error, or no service at all."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of the client's errors: a stable ``code`` and a message that says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class ServiceError(ClientError):
    """The service answered with an error (``{"error": {"code", "message", "details"}}``);
    ``status`` is the HTTP status, None for the error of a job that failed."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.details = details or {}
        self.request_id = request_id


class Unreachable(ClientError):
    """No answer: the connection was refused, reset or timed out (after the retries)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            "unreachable",
            f"cannot reach the service at {url}: {reason}. Start it (`camserve serve`) or "
            "point the URL (--url, CAMSERVE_URL or Client(url)) at a running one.",
        )
        self.url = url
