"""Hand freed heap memory back to the system now and then.

A request's big temporary buffers (a decoded photo, a batch of masked inputs) are freed but glibc
keeps the pages, and each new high-water mark stays in the process's RSS: in a 600 s soak RSS
rose in steps and stayed on each plateau while Python's own heap did not grow. ``malloc_trim``
returns the free pages; it is cheap (milliseconds) and harmless where glibc is absent.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from concurrent.futures import Executor

logger = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


_trim = _load_trim()


def trim_heap() -> bool:
    """Return free heap pages to the system; whether anything was released."""
    return bool(_trim(0)) if _trim is not None else False


async def trim_periodically(every_s: float, executor: Executor | None) -> None:
    """Trim the heap every ``every_s`` seconds, off the event loop, until cancelled."""
    if _trim is None:
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        try:
            await loop.run_in_executor(executor, trim_heap)
        except RuntimeError:  # the executor is shutting down
            return
