"""Fuzz the running service with schemathesis: every check, every phase (stateful included).

Usage (from the repository root)::

    .venv/bin/python tools/fuzz.py                   # the long run of `make fuzz` (10 min)
    .venv/bin/python tools/fuzz.py --max-time 60     # the budget `make test` gives it

Starts ``python -m app`` on a free loopback port on ``model_store/`` (CPU, small limits so that a
fuzzed Score-CAM request stays cheap), runs ``schemathesis run`` on its ``/openapi.json``, stops
the server, and exits with schemathesis's status (0: no failure). Extra arguments after ``--``
go to schemathesis.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
#: Settings for the server under fuzzing: cheap requests, the limits themselves fuzzed too.
SERVER_ENV = {
    "CAMSERVE_DEVICE": "cpu",
    "CAMSERVE_MAX_CAM_FORWARDS": "256",
    "CAMSERVE_REQUEST_TIMEOUT_S": "10",
    "CAMSERVE_MAX_IMAGES": "4",
    "CAMSERVE_MAX_UPLOAD_BYTES": "262144",
    "CAMSERVE_LOG_LEVEL": "WARNING",
    "CAMSERVE_UI": "false",
    "CAMSERVE_GRPC_PORT": "",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(store: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    """``python -m app`` on ``port``, once ``/ready`` answers 200."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CAMSERVE_")}
    environment.update(SERVER_ENV, CAMSERVE_MODEL_STORE=str(store), CAMSERVE_PORT=str(port))
    environment.update(env)
    environment["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=environment)
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=2) as client:  # one client (and TLS context) for every poll
        while True:
            try:
                if client.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    return process
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the server did not start")
            time.sleep(0.2)


def fuzz(url: str, max_time: int, extra: list[str]) -> int:
    """``schemathesis run`` with every check and phase for ``max_time`` seconds."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(REPO / "tools" / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-time",
        str(max_time),
        "--workers",
        "1",  # hypothesis's lambda-source cache is not thread-safe: 2 workers hit its race
        "--suppress-health-check",
        "too_slow,data_too_large",
        "--no-color",
        *extra,
    ]
    return subprocess.run(command, cwd=REPO, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-time", type=int, default=600, help="seconds of fuzzing")
    parser.add_argument("--store", type=Path, default=REPO / "model_store")
    parser.add_argument("extra", nargs="*", help="more schemathesis options (after --)")
    args = parser.parse_args(argv)
    port = free_port()
    server = start(args.store, port)
    try:
        return fuzz(f"http://127.0.0.1:{port}", args.max_time, args.extra)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
