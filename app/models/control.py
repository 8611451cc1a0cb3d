"""Models that change while the service runs (``CAMSERVE_MODEL_CONTROL``).

``none`` loads the store once. ``poll`` re-scans it every ``CAMSERVE_MODEL_POLL_S``: a new folder
is loaded, a changed one reloaded, a removed one unloaded. ``explicit`` changes models only when
the repository API asks. Either way the registry does the work, one load at a time per model.

A poll reports each problem once: a folder that fails to load is logged when it fails, and not
again until its files change; a scan that fails is logged once per reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import TypeVar

from app.errors import ModelBusy, ModelControlMode, ModelNotFound
from app.models.registry import Control, ModelEntry, ModelRegistry

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ModelControl:
    """Loads and unloads the registry's models on a poll or on request."""

    def __init__(
        self,
        registry: ModelRegistry,
        mode: Control,
        poll_s: float,
        executor: Executor | None = None,
    ) -> None:
        self.registry = registry
        self.mode = mode
        self.poll_s = poll_s
        self.executor = executor
        """Threads for loading (the service's model threads: a load runs torch like a pass)."""
        self._reported: dict[str, str] = {}
        """What a poll last logged as failing, per model ("" for the store): logged once."""

    # ------------------------------------------------------------------ the repository API

    async def load(self, name: str) -> ModelEntry:
        """(Re)load ``name`` from its folder; ModelBusy (409) while another load or unload of
        it runs. A client that goes away does not stop the load."""
        self._require_explicit("load")
        return await self._held(name, lambda: self.registry.load(name))

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; requests running on it finish first."""
        self._require_explicit("unload")
        self.registry.entry(name)  # 404 before anything else
        await self._held(name, lambda: self.registry.unload(name))

    def _require_explicit(self, action: str) -> None:
        if self.mode != "explicit":
            raise ModelControlMode(
                f"Models are not changed through the API while CAMSERVE_MODEL_CONTROL is "
                f"{self.mode!r}; set CAMSERVE_MODEL_CONTROL=explicit to {action} models on "
                "request"
                + (" (poll mode follows the store's folders)." if self.mode == "poll" else ".")
            )

    async def _held(self, name: str, work: Callable[[], T]) -> T:
        """``work`` on a loading thread while holding ``name``; the hold ends with the work,
        even when the caller is cancelled first."""
        self.registry.acquire(name)

        def run() -> T:
            try:
                return work()
            finally:
                self.registry.release(name)

        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, run)
        except BaseException:
            self.registry.release(name)
            raise
        return await asyncio.shield(future)

    # ------------------------------------------------------------------ poll mode

    async def watch(self) -> None:
        """Re-scan the store every ``poll_s`` seconds until cancelled (poll mode)."""
        while True:
            await asyncio.sleep(self.poll_s)
            if self.registry.scanned:
                await self.poll()

    async def poll(self) -> None:
        """One scan: load new folders, reload changed ones, unload removed ones."""
        loop = asyncio.get_running_loop()
        try:
            changed, gone = await loop.run_in_executor(None, self.registry.changes)
        except OSError as error:
            self._report("", f"cannot scan the model store {self.registry.store}: {error}")
            return
        self._reported.pop("", None)
        for name in gone:
            logger.info("poll: folder %s is gone; unloading it", name)
            await self._quietly(name, partial(self.registry.unload, name))
        for name in changed:
            known = name in self.registry.entries
            logger.info("poll: folder %s is %s; loading it", name, "changed" if known else "new")
            await self._quietly(name, partial(self.registry.load, name))

    async def _quietly(self, name: str, work: Callable[[], object]) -> None:
        try:
            await self._held(name, work)
        except ModelBusy:
            logger.info("poll: %s is busy; trying again at the next scan", name)
        except ModelNotFound:
            logger.info("poll: folder %s went away while it was read", name)
        except Exception as error:  # a poll must go on whatever one folder does
            self._report(name, f"poll: changing model {name} failed: {error!r}", error)
        else:
            self._reported.pop(name, None)

    def _report(self, key: str, message: str, error: Exception | None = None) -> None:
        """Log ``message`` unless it is what was last logged for ``key``."""
        if self._reported.get(key) == message:
            logger.debug("%s (again)", message)
            return
        self._reported[key] = message
        logger.error(message, exc_info=error)
