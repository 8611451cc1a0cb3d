"""Phase 2 of a request: gather concurrent requests that can share one pass, run it, scatter back.

One ``Batcher`` per model. A request is submitted with a key (what must match for two requests to
share a pass: the kind of pass, method, layers, options, ``normalized``), its images and the
function that runs a pass over several requests. While the model is idle a request runs at once,
alone. While a pass runs, newcomers queue; when it ends, the oldest waiting request and the later
ones with the same key form the next pass, up to ``max_images`` images, waiting at most
``timeout_s`` after the oldest arrived for more company.

A request whose caller is cancelled (its client went away, its deadline passed, its job was
cancelled) before its pass starts is dropped; once its pass runs, the pass stops at its next chunk
if every request in it was cancelled (``PassControl.should_stop``). A pass that fails is run again
one request at a time, so a request that breaks a batch fails alone, with its own error, and the
others still get their answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from app.cam import CamInterrupted, ProgressCallback
from app.pipeline.admission import SlotLimiter

logger = logging.getLogger(__name__)


class PassControl:
    """What a running pass may ask of its requests, from its worker thread: whether all of them
    were cancelled (then it stops at its next chunk) and where to report its progress."""

    def __init__(self, pending: Sequence[_Pending]) -> None:
        self._pending = list(pending)

    def should_stop(self) -> bool:
        return all(p.abandoned.is_set() for p in self._pending)

    def progress(self, done: int, total: int) -> None:
        for pending in self._pending:
            if pending.progress is not None and not pending.abandoned.is_set():
                pending.progress(done, total)


RunPass = Callable[[Sequence[Any], PassControl], Sequence[Any]]
"""Runs one pass over the items of several requests, in a worker thread: one result per item."""

_IDLE_EXIT_S = 60.0


@dataclass(frozen=True)
class PassInfo:
    """What a request learns about the pass it ran in."""

    queue_s: float
    """From submission to the start of its pass."""
    batch_images: int
    """Images in that pass, its own included."""


@dataclass(eq=False)
class _Pending:
    key: Hashable
    item: Any
    images: int
    batchable: bool
    run: RunPass
    future: asyncio.Future[tuple[Any, PassInfo]]
    progress: ProgressCallback | None = None
    """Called from the worker thread between chunks of the pass (must be thread-safe)."""
    submitted: float = field(default_factory=time.perf_counter)
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when the caller is gone; read by the pass's thread."""

    @property
    def live(self) -> bool:
        return not self.future.done()


class Batcher:
    """Cross-request batching for one model; its passes run one at a time, each in a model slot."""

    def __init__(
        self,
        name: str,
        limiter: SlotLimiter,
        max_images: int,
        timeout_s: float,
        executor: Executor | None = None,
        on_pass: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.limiter = limiter
        self.max_images = max(1, max_images)
        self.timeout_s = max(0.0, timeout_s)
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._forming = False
        self._worker: asyncio.Task[None] | None = None
        self.executor = executor
        """Threads for the passes (the service's model threads); None: anyio's pool."""
        self.on_pass = on_pass
        """Told the number of images of every pass that ran (the metrics' batch histogram)."""

    @property
    def waiting(self) -> int:
        """Requests queued for a pass (not counting those running)."""
        return sum(1 for p in self._queue if p.live)

    async def submit(
        self,
        key: Hashable,
        item: Any,
        images: int,
        run: RunPass,
        batchable: bool = True,
        progress: ProgressCallback | None = None,
    ) -> tuple[Any, PassInfo]:
        """Run ``item`` in a pass with compatible requests: its result and how it ran.

        Admission is the caller's (before it decodes anything). Cancelling the caller drops a
        request still queued, and stops a running pass at its next chunk once none of its
        requests is left."""
        future: asyncio.Future[tuple[Any, PassInfo]] = asyncio.get_running_loop().create_future()
        pending = _Pending(
            key, item, images, batchable and self.max_images > 1, run, future, progress
        )
        self._queue.append(pending)
        self._arrived.set()
        self._ensure_worker()
        try:
            return await future
        finally:
            if not future.done() or future.cancelled():
                pending.abandoned.set()
            if pending in self._queue:
                self._queue.remove(pending)

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with a cancellation."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for pending in self._queue:
            if pending.live:
                pending.future.cancel()
        self._queue.clear()

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name=f"batcher-{self.name}"
            )

    async def _work(self) -> None:
        while True:
            self._queue = [p for p in self._queue if p.live]
            if not self._queue:
                self._forming = False
                if not await self._wait_for_arrival(_IDLE_EXIT_S):
                    return  # idle: the next submit starts a new worker
                continue
            group = await self._form_group()
            if group:
                await self._run_group(group)
                # Whatever queued while that pass ran is a batch already forming.
                self._forming = any(p.live for p in self._queue)
            del group  # its requests hold their model: a model swapped out is freed now

    async def _wait_for_arrival(self, timeout: float) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _compatible(self, first: _Pending) -> list[_Pending]:
        group = [first]
        if not first.batchable:
            return group
        images = first.images
        for other in self._queue[self._queue.index(first) + 1 :]:
            if not (other.live and other.batchable and other.key == first.key):
                continue
            if images + other.images > self.max_images:
                break
            group.append(other)
            images += other.images
        return group

    async def _form_group(self) -> list[_Pending]:
        first = self._queue[0]
        group = self._compatible(first)
        # A lone request on an idle model goes at once: only a forming batch waits for company.
        while self._forming and first.live and sum(p.images for p in group) < self.max_images:
            left = first.submitted + self.timeout_s - time.perf_counter()
            if left <= 0 or not await self._wait_for_arrival(left):
                break
            group = self._compatible(first)
        group = [p for p in group if p.live]
        for pending in group:
            self._queue.remove(pending)
        return group

    async def _run_group(self, group: list[_Pending]) -> None:
        outcome = await self._run(group)
        if isinstance(outcome, CamInterrupted) or not any(p.live for p in group):
            if isinstance(outcome, CamInterrupted):
                logger.info("%s: pass stopped early, its callers are gone (%s)", self.name, outcome)
            return  # nobody is left to answer
        if not isinstance(outcome, Exception) or len(group) == 1:
            self._settle(group, outcome)
            return
        logger.warning(
            "a batched pass of %d requests on %s failed (%s: %s); running them one by one",
            len(group),
            self.name,
            type(outcome).__name__,
            outcome,
        )
        for pending in group:
            if pending.live:
                self._settle([pending], await self._run([pending]))

    async def _run(self, group: list[_Pending]) -> tuple[float, Sequence[Any]] | Exception:
        """(start time, results) of one pass, or the exception it raised."""

        control = PassControl(group)

        def work() -> tuple[float, Sequence[Any]]:
            started = time.perf_counter()
            if control.should_stop():  # every caller left while the pass waited for its slot
                raise CamInterrupted("every request of the pass was cancelled")
            control.progress(0, 0)  # the pass has started; its size is the method's to say
            return started, group[0].run([p.item for p in group], control)

        try:
            outcome = await self.limiter.run_in_slot(work, self.executor)
        except Exception as error:  # handed to the requests, which turn it into their answer
            return error
        if self.on_pass is not None:
            self.on_pass(sum(p.images for p in group))
        return outcome

    @staticmethod
    def _settle(group: list[_Pending], outcome: tuple[float, Sequence[Any]] | Exception) -> None:
        if isinstance(outcome, Exception):
            for pending in group:
                if pending.live:
                    pending.future.set_exception(outcome)
            return
        started, results = outcome
        images = sum(p.images for p in group)
        for pending, result in zip(group, results, strict=True):
            if pending.live:
                info = PassInfo(queue_s=started - pending.submitted, batch_images=images)
                pending.future.set_result((result, info))
