"""``python -m app``: serve the model store with uvicorn (HTTP) and, unless
``CAMSERVE_GRPC_PORT`` is empty, gRPC beside it in the same event loop, configured from
CAMSERVE_* variables. ``--workers N`` (``CAMSERVE_WORKERS``) runs N such processes on the same
ports (``app.workers``)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.observability.logs import configure_logging
from app.openmp import WAIT_POLICY, prefer_passive_waits
from app.settings import ConfigurationError, Settings, load_settings
from app.workers import WORKER_FLAG, Supervisor, reuse_port_socket

if TYPE_CHECKING:
    from app.http.server import DrainingServer

_WATCH_S = 0.1


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m app [--workers N]``."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument(
        "--workers", type=int, default=None, help="service processes on the port (CAMSERVE_WORKERS)"
    )
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {} if args.workers is None else {"workers": args.workers}
    return serve(overrides, worker=args.worker)


def main(**overrides: Any) -> int:
    """Validate the settings (``overrides`` win over the environment), set up logging and run
    the servers until interrupted; with several workers, start and watch them instead."""
    return serve(overrides)


def serve(overrides: dict[str, Any], *, worker: bool = False) -> int:
    """``main``; ``worker``: this process is one of several (it shares the ports with its
    siblings)."""
    passive = prefer_passive_waits()  # before torch loads (app.http.server imports it)
    try:
        settings = load_settings(**overrides)
    except ConfigurationError as error:
        print(f"camserve: {error}", file=sys.stderr)
        return 2
    if not worker:  # a worker's siblings hold the port already
        refusal = port_refusal(settings.host, settings.port, taken=(settings.grpc_port,))
        if refusal is not None:
            print(f"camserve: {refusal}", file=sys.stderr)
            return 1
    configure_logging(settings.log_level, settings.log_format)
    if not passive:
        logging.getLogger("app.openmp").info(
            "torch was loaded before the service could set %s=PASSIVE: its threads spin after "
            "each operator; set it in the environment",
            WAIT_POLICY,
        )
    if settings.workers > 1 and not worker:
        return Supervisor(settings.workers, overrides).run()
    from app.http.server import build_server

    sockets = None
    if worker:
        try:
            sockets = [reuse_port_socket(settings.host, settings.port)]
        except OSError as error:
            print(
                f"camserve: worker cannot listen on {settings.host} port {settings.port} "
                f"({error.strerror}); another program holds it",
                file=sys.stderr,
            )
            return 1
    server = build_server(settings)
    if settings.grpc_port is None:
        server.run(sockets=sockets)
        return leave(server, 0)
    from uvicorn._compat import asyncio_run

    status = asyncio_run(
        _serve_both(server, settings, sockets), loop_factory=server.config.get_loop_factory()
    )
    return leave(server, status)


def leave(server: DrainingServer, status: int) -> int:
    """``status``; or the process ends at once with it when the lifespan left model threads
    busy (``app.state.threads_left``: a load stuck in the file system): the interpreter joins
    a thread pool's threads at its exit, so a SIGTERM would never end the process."""
    state = getattr(server.config.app, "state", None)
    if getattr(state, "threads_left", False) is True:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


async def _serve_both(
    server: DrainingServer, settings: Settings, sockets: list[socket.socket] | None = None
) -> int:
    """HTTP and gRPC together. The drain after SIGTERM is the HTTP server's (its lifecycle
    counts the gRPC calls in flight and refuses new ones); once it lets the server exit, gRPC
    stops too, before the lifespan closes what the calls use."""
    from app.grpc.server import GrpcServer
    from app.http.server import UVICORN_SHUTDOWN_S

    assert settings.grpc_port is not None
    try:  # in the loop: a grpc.aio server belongs to the loop it is made in
        app: Any = server.config.app  # the FastAPI app: its state is filled by its lifespan
        grpc_server = GrpcServer(
            app.state, settings.host, settings.grpc_port, reuse_port=sockets is not None
        )
    except RuntimeError as error:
        print(
            f"camserve: cannot listen for gRPC on {settings.host}:{settings.grpc_port} "
            f"({error}); free the port, pick another with CAMSERVE_GRPC_PORT, or set it empty "
            "to serve HTTP only",
            file=sys.stderr,
        )
        return 2

    async def stop_with_http() -> None:
        while not server.should_exit:
            await asyncio.sleep(_WATCH_S)
        await grpc_server.stop(UVICORN_SHUTDOWN_S)

    await grpc_server.start()
    follower = asyncio.create_task(stop_with_http())
    try:
        await server.serve(sockets=sockets)
    finally:
        if not follower.done():
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        await grpc_server.stop(0)
    return 0


def port_refusal(host: str, port: int, taken: tuple[int | None, ...] = ()) -> str | None:
    """Why the server could not listen on ``host:port``, or None when it can: checked before
    anything is loaded, by binding each address as uvicorn (asyncio) does, then letting go.
    The port it suggests instead is none of ``taken`` (the service's other ports)."""
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
                    other = next(p for p in range(port + 1, port + 4) if p not in taken)
                    other = other if other <= 65535 else 8000
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
    sys.exit(cli())
