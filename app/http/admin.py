"""The repository API's guard: ``CAMSERVE_ADMIN_KEY`` in ``X-Admin-Key``, a key of its own.

Without that setting the API is off: every call answers 403 with how to turn it on.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from app.errors import RepositoryOff, Unauthorized
from app.http.deps import get_settings
from app.models.control import ModelControl

ADMIN_KEY_HEADER = "X-Admin-Key"
_admin_key_header = APIKeyHeader(
    name=ADMIN_KEY_HEADER,
    auto_error=False,
    scheme_name="AdminKey",
    description="CAMSERVE_ADMIN_KEY; the repository API (load, unload, index) is off without it",
)


async def require_admin_key(
    request: Request, admin_key: str | None = Depends(_admin_key_header)
) -> None:
    """Refuse unless the admin key is set (403) and sent (401)."""
    expected = get_settings(request).admin_key
    if expected is None:
        raise RepositoryOff(
            "The repository API (load, unload, index) is off. Set CAMSERVE_ADMIN_KEY to a "
            f"secret to turn it on, and send that secret in the {ADMIN_KEY_HEADER} header."
        )
    if admin_key is None or not secrets.compare_digest(
        admin_key.encode(), expected.get_secret_value().encode()
    ):
        raise Unauthorized(
            f"Missing or wrong admin key; send CAMSERVE_ADMIN_KEY in the {ADMIN_KEY_HEADER} "
            "header.",
            headers={"WWW-Authenticate": "ApiKey"},
        )


def get_control(request: Request) -> ModelControl:
    return request.app.state.control  # type: ignore[no-any-return]
