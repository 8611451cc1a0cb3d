"""Freed heap pages go back to the system."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from app.models import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_returns_freed_pages() -> None:
    blocks = [np.ones(64 * 1024, dtype=np.uint8) for _ in range(2000)]  # 128 MiB of small blocks
    del blocks[::2]  # holes a trim can hand back
    del blocks
    assert memory.trim_heap() is True


def test_periodic_trim_runs_and_stops_when_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_trim", lambda pad: calls.append(pad) or 1)

    async def scenario() -> None:
        task = asyncio.ensure_future(memory.trim_periodically(0.01, None))
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()

    asyncio.run(scenario())
    assert calls[:3] == [0, 0, 0]
