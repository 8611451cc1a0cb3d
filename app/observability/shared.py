"""Metrics that the workers of ``--workers N`` share: prometheus_client's multiprocess mode.

When ``PROMETHEUS_MULTIPROC_DIR`` names a folder before prometheus_client is imported, every
counter, histogram and gauge of a process keeps its values in memory-mapped files there (one set
per process id), and a scrape reads the files of every process and adds them up. The supervisor
makes the folder and hands it to its workers; this module is what both sides need, light enough
for the supervisor (no torch, no metric)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's own variable: the folder of the shared metrics' files."""


def shared_folder() -> Path | None:
    """The folder of the shared metrics, when this process shares them."""
    folder = os.environ.get(SHARED_METRICS_ENV)
    return Path(folder) if folder else None


def clear(folder: Path) -> None:
    """Remove the files an earlier run left (prometheus_client would add their counts in)."""
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)


def forget(pid: int, folder: Path) -> None:
    """A worker has exited: its "live" gauges (queue depth, requests in flight, ...) no longer
    count; its counters and histograms still do, as every process's."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]
