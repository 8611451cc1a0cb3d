"""``camserve serve``: the HTTP service, as ``python -m app`` runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import click


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
    from app.__main__ import main as serve_main

    given = {
        "host": host,
        "port": port,
        "workers": workers,
        "model_store": model_store,
        "device": device,
    }
    sys.exit(serve_main(**{k: v for k, v in given.items() if v is not None}))
