"""``python -m app``: serve the model store with uvicorn, configured from CAMSERVE_* variables."""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from app.observability.logs import configure_logging
from app.settings import ConfigurationError, load_settings


def main(**overrides: Any) -> int:
    """Validate the settings (``overrides`` win over the environment), set up logging and run
    the server until interrupted."""
    try:
        settings = load_settings(**overrides)
    except ConfigurationError as error:
        print(f"camserve: {error}", file=sys.stderr)
        return 2
    refusal = port_refusal(settings.host, settings.port)
    if refusal is not None:
        print(f"camserve: {refusal}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level, settings.log_format)
    from app.http.server import build_server

    build_server(settings).run()
    return 0


def port_refusal(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port``, or None when it can: checked before
    anything is loaded, by binding each address as uvicorn (asyncio) does, then letting go."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot resolve the address {host!r} ({error.strerror}); set CAMSERVE_HOST."
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    other = port + 1 if port < 65535 else 8000
                    return (
                        f"port {port} on {host} is already in use; stop what listens there or "
                        f"pick another port with CAMSERVE_PORT (CAMSERVE_PORT={other} make serve)."
                    )
                return (
                    f"cannot listen on {host} port {port} ({error.strerror}); pick another "
                    "port with CAMSERVE_PORT or address with CAMSERVE_HOST."
                )
    return None


if __name__ == "__main__":
    sys.exit(main())
