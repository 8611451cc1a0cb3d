"""The repository API's guard: ``CAMSERVE_ADMIN_KEY`` in ``X-Admin-Key``, a key of its own.

Without that setting the API is off: every call answers 403 with how to turn it on.
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from app.http.deps import settings_of
from app.models.control import ModelControl
from app.protocols.repository import require_admin_key as check_admin_key

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
    check_admin_key(settings_of(request).admin_key, admin_key, f"the {ADMIN_KEY_HEADER} header")


async def get_control(request: Request) -> ModelControl:
    return request.app.state.control  # type: ignore[no-any-return]
