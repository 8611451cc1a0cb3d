"""The host names the service answers to (``CAMSERVE_ALLOWED_HOSTS``): DNS rebinding.

A browser trusts a name, not an address: a site whose owner makes its name resolve to 127.0.0.1
after its page has loaded (DNS rebinding) gets that page's scripts to call whatever listens
there as the page's own origin, so neither CORS nor the gate's origin check, which compare the
page with the ``Host`` it sent, can tell it from the service's own page; and a plain-HTTP page's
same-origin GET carries neither ``Origin`` nor ``Sec-Fetch-Site``, so such a request looks like
curl's. Only the ``Host`` header still names the site. So a request must name a host the
service answers to: an IP address (a rebound site is always a name), a loopback name
(``localhost``, ``*.localhost``), or one of the setting's. The rule holds by default on a
service that binds a loopback address, the one a browser on this machine can reach; a service
that listens beyond loopback answers any name unless the setting lists them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import HostNotAllowed
from app.http.errors import send_refusal


def is_address(host: str) -> bool:
    """Whether ``host`` is an IP address rather than a name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    name = host.lower().strip("[]").rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(allowed: Sequence[str], bound: str) -> tuple[str, ...] | None:
    """The names the service answers to beside addresses and the loopback names (``*.``
    prefixes: subdomains), or None for any name: ``CAMSERVE_ALLOWED_HOSTS``; when it is empty,
    none on a service that binds a loopback address, any on one that listens beyond."""
    if "*" in allowed or (not allowed and not is_loopback(bound)):
        return None
    return tuple(allowed)


class AllowedHostsMiddleware:
    """Refuse (403 ``host_not_allowed``) a request whose ``Host`` is neither an address, a
    loopback name nor one of ``hosts``."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.names = frozenset(h.rstrip(".") for h in hosts if not h.startswith("*."))
        self.domains = tuple(h[1:].rstrip(".") for h in hosts if h.startswith("*."))

    def allows(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        if is_address(name) or is_loopback(name) or name in self.names:
            return True
        return bool(self.domains) and name.endswith(self.domains)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = dict(scope["headers"]).get(b"host")
            # (No Host at all, as HTTP/1.0 allows, is no browser's: browsers always send one.)
            host = None if raw is None else raw.decode("latin-1")
            if host is not None and not self._answers(host):
                await send_refusal(send, _refusal(host))
                return
        await self.app(scope, receive, send)

    def _answers(self, raw: str) -> bool:
        try:
            host = urlsplit("//" + raw).hostname or ""
        except ValueError:  # a Host that is no host[:port]
            return False
        return self.allows(host)


def _refusal(host: str) -> HostNotAllowed:
    return HostNotAllowed(
        f"This service does not answer to the name {host[:80]!r}; call it by a name it answers "
        "to (on this machine: localhost or 127.0.0.1) or by its address, or add the name to "
        "CAMSERVE_ALLOWED_HOSTS.",
        details={"host": host[:80]},
    )
