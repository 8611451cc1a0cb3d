"""``camserve serve``: the HTTP service, `python -m app` run in this process's place."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from app.settings import ENV_PREFIX


@click.command()
@click.option("--host", help="address to bind [env: CAMSERVE_HOST; default 127.0.0.1]")
@click.option("--port", type=int, help="port to bind [env: CAMSERVE_PORT; default 8000]")
@click.option(
    "--workers",
    type=int,
    help="service processes on the port, each with its own models [env: CAMSERVE_WORKERS; "
    "default 1; more needs CAMSERVE_JOB_STORE=redis://...]",
)
@click.option(
    "--model-store",
    type=click.Path(path_type=Path),
    help="folder with one folder per model [env: CAMSERVE_MODEL_STORE; default model_store]",
)
@click.option("--device", help="auto, cpu, cuda or cuda:N [env: CAMSERVE_DEVICE; default auto]")
def serve(
    host: str | None,
    port: int | None,
    workers: int | None,
    model_store: Path | None,
    device: str | None,
) -> None:
    """Run the HTTP service (what `python -m app` does); Ctrl-C drains and stops it.

    Every other setting comes from CAMSERVE_* variables (see the configuration docs)."""
    given = {
        "host": host,
        "port": port,
        "workers": workers,
        "model_store": model_store,
        "device": device,
    }
    env = dict(os.environ)
    env.update({ENV_PREFIX + k.upper(): str(v) for k, v in given.items() if v is not None})
    # The service, in this process's place: this process has loaded torch (the client checks
    # requests with the engine's rules), too early for the OpenMP wait policy that
    # `python -m app` sets before torch loads (app.openmp).
    os.execve(sys.executable, [sys.executable, "-m", "app"], env)
