"""Why a Redis server refuses the job store, in words an operator can act on.

Redis being away (refused or dropped connections, timeouts, a server still loading) passes by
itself: the store waits for it. A refusal does not: the server asks for a password that is
missing or wrong, has no database of the URL's index, lets the user run no command the store
needs, or is no Redis at all. Only a setting (or the server's configuration) fixes that, so the
store stops startup on one, and names the cause and the fix in its 503s when one comes later.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from redis import exceptions as redis_errors

from app.digits import whole_number

STORE = "CAMSERVE_JOB_STORE"
PASSWORD = "CAMSERVE_JOB_STORE_PASSWORD"


@dataclass(frozen=True)
class Refusal:
    """The setting to change, what the server refused, and how to fix it."""

    setting: str
    cause: str
    fix: str

    def line(self) -> str:
        """One line for the operator: ``SETTING: cause; fix``."""
        return f"{self.setting}: {self.cause}; {self.fix}"


@dataclass(frozen=True)
class Target:
    """Where the store connects, without its secret, and where its password comes from."""

    where: str
    """``host:port/db`` (no password)."""
    db: int
    password_in_url: bool
    password_given: bool

    @classmethod
    def of(cls, url: str, password: str | None) -> Target:
        """The target of ``CAMSERVE_JOB_STORE=url`` with ``CAMSERVE_JOB_STORE_PASSWORD``."""
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        db = whole_number(parts.path.strip("/")) or 0
        in_url = bool(parts.password)
        return cls(f"{host}:{parts.port or 6379}/{db}", db, in_url, in_url or bool(password))


def refusal(error: BaseException, target: Target) -> Refusal | None:
    """The refusal ``error`` is, or None when Redis is merely away or busy (or ``error`` is
    none of the server's doing)."""
    if isinstance(error, redis_errors.AuthenticationError):
        return _password_refused(error, target)
    if isinstance(error, redis_errors.NoPermissionError):
        return Refusal(
            STORE,
            f"the Redis server at {target.where} does not let the URL's user run a command the "
            f"job store needs ({error})",
            "give that user the commands and keys it needs (+@all ~camserve:*), or name "
            "another user in the URL",
        )
    if isinstance(error, redis_errors.ResponseError) and "DB index is out of range" in str(error):
        return Refusal(
            STORE,
            f"the Redis server at {target.where} has no database {target.db} (DB index is out "
            "of range: a server has 16, 0 to 15, unless its `databases` setting says more)",
            "name a database the server has at the end of the URL, such as redis://host:6379/0",
        )
    if isinstance(error, redis_errors.InvalidResponse):
        return Refusal(
            STORE,
            f"the server at {target.where} does not answer in the Redis protocol ({error})",
            "check the host and port of the URL (and use rediss:// for a Redis that only speaks "
            "TLS)",
        )
    return None


def _password_refused(error: BaseException, target: Target) -> Refusal:
    """Authentication failed: no password was given, or the server refused the one given."""
    if not target.password_given:
        return Refusal(
            PASSWORD,
            f"authentication failed: the Redis server at {target.where} requires a password "
            "and none is set",
            f"set {PASSWORD} to the server's password (or put it in the URL, "
            "redis://:password@host:6379/0)",
        )
    setting = STORE if target.password_in_url else PASSWORD
    where = "the password in the URL" if target.password_in_url else PASSWORD
    return Refusal(
        setting,
        f"authentication failed: the Redis server at {target.where} refused the password "
        f"({str(error).rstrip('.')})",
        f"set {where} to the server's password (and the URL's user, if it names one, to a "
        "user the server knows)",
    )
