"""Several service processes on one port (``CAMSERVE_WORKERS``, ``python -m app --workers N``).

The parent loads nothing: it starts N ``python -m app --worker`` children and waits. Each child
is the whole service (its own models on the same device, its own batcher and pools) and binds
the HTTP port, and the gRPC port, with SO_REUSEPORT, so that the kernel spreads new connections
over the children. A signal to the parent (SIGTERM, SIGINT) is passed to every child, each of
which drains as a single process does; the parent exits once all have. A child that exits on
its own stops the others (an orchestrator restarts the whole), and the parent exits with its
status. The workers share their metrics through a folder the parent makes for the run
(``app.observability.shared``), so that a scrape answers for all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from app.observability.shared import SHARED_METRICS_ENV, clear, forget, shared_folder

logger = logging.getLogger(__name__)

WORKER_FLAG = "--worker"
"""The argument of a child: serve, binding the ports with SO_REUSEPORT."""
_POLL_S = 0.1


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that the other workers may bind too (uvicorn listens
    on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Starts the worker processes and passes signals on to them."""

    def __init__(
        self,
        count: int,
        overrides: dict[str, Any] | None = None,
        command: tuple[str, ...] = (sys.executable, "-m", "app", WORKER_FLAG),
    ) -> None:
        self.count = count
        self.command = command
        # Settings given as arguments (camserve serve --port ...) reach the workers as variables.
        self.env = {f"CAMSERVE_{k.upper()}": str(v) for k, v in (overrides or {}).items()}
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            logger.info("camserve: %s: stopping the workers", signal.Signals(signum).name)
        self._pass_on(signum)

    def _pass_on(self, signum: int) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        # The workers share their metrics through files in one folder
        # (``app.observability.shared``): the operator's, or one of ours for this run.
        given = shared_folder()
        folder = given or Path(tempfile.mkdtemp(prefix="camserve-metrics-"))
        clear(folder)
        try:
            return self._run(folder)
        finally:
            if given is None:
                shutil.rmtree(folder, ignore_errors=True)

    def _run(self, folder: Path) -> int:
        env = {
            **os.environ,
            **self.env,
            "CAMSERVE_WORKERS": str(self.count),
            SHARED_METRICS_ENV: str(folder),
        }
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for _ in range(self.count):
                if self.stopping:  # a signal while starting: no more workers
                    break
                # A session of their own: Ctrl-C in a terminal reaches only this process, which
                # passes it on once (a worker given a second signal stops without draining).
                self.children.append(
                    subprocess.Popen(list(self.command), env=env, start_new_session=True)
                )
            logger.info(
                "camserve: %d workers (pids %s)",
                self.count,
                ", ".join(str(c.pid) for c in self.children),
            )
            return self._wait(folder)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _wait(self, folder: Path) -> int:
        failed: int | None = None
        forgotten: set[int] = set()  # workers that exited: their live gauges no longer count
        while True:
            codes = [child.poll() for child in self.children]
            if all(code is not None for code in codes):
                if failed is not None:
                    return failed
                return max((abs(code) for code in codes if code), default=0)
            for child, code in zip(self.children, codes, strict=True):
                if code is not None and child.pid not in forgotten:
                    forgotten.add(child.pid)
                    forget(child.pid, folder)
            if not self.stopping:
                for child, code in zip(self.children, codes, strict=True):
                    if code is not None:
                        logger.error(
                            "camserve: worker %d exited with status %s; stopping the others",
                            child.pid,
                            code,
                        )
                        failed = abs(code) or 1
                        self._pass_on(signal.SIGTERM)
                        break
            time.sleep(_POLL_S)
