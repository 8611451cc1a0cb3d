"""``camserve models``: the models, their status, layers and methods, here or on a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.table import Table

from camserve.cli.common import (
    local_settings,
    out,
    quiet_logs,
    reported_errors,
    server_options,
    store_options,
)
from camserve.client import Client
from camserve.local import LocalService, ModelRow


@click.command()
@server_options
@store_options
def models(
    url: str | None, api_key: str | None, model_store: Path | None, device: str | None
) -> None:
    """List the models with their status, target layers and the methods that apply."""
    with reported_errors():
        quiet_logs(False)
        rows = (
            _remote_models(url, api_key) if url else asyncio.run(_local_models(model_store, device))
        )
        table = Table("model", "status", "layers", "methods")
        for row in rows:
            status = row.status if row.error is None else f"{row.status}: {row.error}"
            table.add_row(row.name, status, ", ".join(row.layers), ", ".join(row.methods))
        out.print(table)


async def _local_models(model_store: Path | None, device: str | None) -> list[ModelRow]:
    async with LocalService(local_settings(model_store, device)) as service:
        return service.models()


def _remote_models(url: str, api_key: str | None) -> list[ModelRow]:
    with Client(url, api_key=api_key) as client:
        rows = []
        for summary in client.models().models:
            if summary.status != "ready":
                rows.append(ModelRow(summary.name, summary.status, error=summary.error))
                continue
            detail = client.model(summary.name)
            rows.append(
                ModelRow(
                    detail.name,
                    detail.status,
                    tuple(detail.target_layers),
                    tuple(detail.methods),
                )
            )
        return rows
