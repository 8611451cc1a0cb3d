"""Phase 2 of a request: gather concurrent requests that can share one pass, run it, scatter back.

One ``Batcher`` per model. A request is submitted with a key (what must match for two requests to
share a pass: the kind of pass, method, layers, options, ``normalized``), its images and the
function that runs a pass over several requests. While the model is idle a request runs at once,
alone. While a pass runs, newcomers queue; when it ends, the first waiting request in turn order
(below) and the later ones with the same key form the next pass, up to ``max_images`` images,
waiting at most ``timeout_s`` after the first arrived for more company.

Every request has a priority class (``app.pipeline.scheduling``): interactive requests go before
background ones, and a batch holds requests of one class. Within a class turns go round robin
among clients (``app.pipeline.fairness``, every image one turn): a client with many requests
queued delays another client's next one by at most one of its own. (An admitted request's client
and place: ``app.pipeline.admission``.)

A chunked pass (``submit(chunked=True)``: the Score-CAM family, Ablation-CAM, SmoothGrad-CAM++)
does not keep the model to itself: while it runs it is the model's ``Host``, and the next short
passes are formed as usual and offered to it; it runs them on its thread at its next chunk
boundary (``PassControl.at_boundary``), or at a pause inside a chunk's forward
(``PassControl.at_pause``), in the scheduler's order, then resumes. Until its turn comes, a short
pass offered to the host still takes the compatible requests that arrive. A second chunked
pass waits until the first one ends.

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
from collections.abc import Callable, Coroutine, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from app.cam import CamInterrupted, ProgressCallback
from app.pipeline.admission import SlotLimiter, Ticket, current_ticket
from app.pipeline.fairness import FairTurns, current_caller
from app.pipeline.scheduling import PRIORITIES, Guest, Host, Priority, TurnRules

logger = logging.getLogger(__name__)


class PassControl:
    """What a running pass may ask of its requests, from its worker thread: whether all of them
    were cancelled (then it stops at its next chunk) and where to report its progress."""

    def __init__(
        self,
        pending: Sequence[_Pending],
        host: Host | None = None,
        fit: Callable[[], None] | None = None,
    ) -> None:
        self._pending = list(pending)
        self._host = host
        self._fit = fit
        """Sizes the pass's thread team again (after the guests it ran sized it for theirs)."""

    def should_stop(self) -> bool:
        return all(p.abandoned.is_set() for p in self._pending)

    def at_boundary(self) -> bool:
        """Between two chunks: a host runs the passes whose turn it is, then asks to stop."""
        if self._host is not None:
            self._host.boundary()
        if self._fit is not None:
            self._fit()
        return self.should_stop()

    def at_pause(self) -> None:
        """Inside a chunk's forward: a host runs the passes whose turn it is."""
        if self._host is not None:
            self._host.pause()
        if self._fit is not None:
            self._fit()

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
    guest: bool = False
    """Whether it ran between two chunks of a chunked pass, on that pass's thread."""


@dataclass(eq=False)
class _Pending:
    key: Hashable
    item: Any
    images: int
    batchable: bool
    run: RunPass
    future: asyncio.Future[tuple[Any, PassInfo]]
    progress: ProgressCallback | None = None
    priority: Priority = "interactive"
    chunked: bool = False
    """Its pass has chunk boundaries (and may host other passes)."""
    """Called from the worker thread between chunks of the pass (must be thread-safe)."""
    ticket: Ticket | None = None
    """Its request's admitted place (None for work not admitted: background jobs)."""
    submitted: float = field(default_factory=time.perf_counter)
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when the caller is gone; read by the pass's thread."""
    tag: int = 0
    """Its turn among its class's requests (``app.pipeline.fairness``)."""
    caller: str = field(default_factory=current_caller)
    """Who submitted it (a job: the client that created it)."""

    @property
    def live(self) -> bool:
        return not self.future.done()

    @property
    def order(self) -> tuple[int, int, float]:
        """Turn order: class, then tag, then age."""
        return (PRIORITIES.index(self.priority), self.tag, self.submitted)

    @property
    def client(self) -> str:
        return self.ticket.caller if self.ticket is not None else self.caller

    def fail(self, error: Exception) -> None:
        """Answer it with ``error`` while it waits (its place was given to another client)."""
        if self.live:
            self.future.set_exception(error)

    def taken(self) -> None:
        """It left the queue for a pass."""
        if self.ticket is not None:
            self.ticket.dequeued(self, into_pass=True)


class _Seal:
    """Whether a formed group still takes newcomers: open while it waits for a host's turn,
    sealed (from the pass's thread, under the lock) when its pass starts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sealed = False

    def close(self) -> None:
        with self.lock:
            self.sealed = True


class Batcher:
    """Cross-request batching and turns for one model; each pass runs in a model slot, except the
    short passes that run between two chunks of a chunked one, on its thread and in its slot."""

    def __init__(
        self,
        name: str,
        limiter: SlotLimiter,
        max_images: int,
        timeout_s: float,
        executor: Executor | None = None,
        on_pass: Callable[[int, float], None] | None = None,
        *,
        turns: TurnRules = TurnRules(),
        on_wait: Callable[[Priority, float], None] | None = None,
        on_yield: Callable[[], None] | None = None,
        fit: Callable[[Priority], None] | None = None,
    ) -> None:
        self.name = name
        self.limiter = limiter
        self.max_images = max(1, max_images)
        self.timeout_s = max(0.0, timeout_s)
        self.turns = turns
        """How a chunked pass shares the model with the short passes offered to it."""
        self._queue: list[_Pending] = []
        self._turns = {priority: FairTurns() for priority in PRIORITIES}
        """Per class: the round robin among clients."""
        self._arrived = asyncio.Event()
        self._forming = False
        self._worker: asyncio.Task[None] | None = None
        self._host: Host | None = None
        self._hosting: set[asyncio.Task[None]] = set()
        self.executor = executor
        """Threads for the passes (the service's model threads); None: anyio's pool."""
        self.on_pass = on_pass
        """Told the number of images and the seconds of every pass that ran (the metrics' batch
        histogram, Triton's batch statistics)."""
        self.on_wait = on_wait
        """Told (priority, seconds) for every request whose pass started (the queue wait)."""
        self.on_yield = on_yield
        """Told (from a pass thread) whenever a chunked pass let other passes run."""
        self.fit = fit
        """Called with the pass's class on its thread when a pass starts, and at every boundary
        and pause of a chunked one: sizes the thread's intra-op team
        (``app.pipeline.cpu_share``)."""

    @property
    def waiting(self) -> int:
        """Requests queued for a pass (not counting those running), those offered to the running
        chunked pass included."""
        hosted = self._host.waiting if self._host is not None else 0
        return sum(1 for p in self._queue if p.live) + hosted

    async def submit(
        self,
        key: Hashable,
        item: Any,
        images: int,
        run: RunPass,
        batchable: bool = True,
        progress: ProgressCallback | None = None,
        *,
        priority: Priority = "interactive",
        chunked: bool = False,
    ) -> tuple[Any, PassInfo]:
        """Run ``item`` in a pass with compatible requests: its result and how it ran.

        ``chunked``: the pass reports chunk boundaries (``PassControl.at_boundary``), where the
        model's other passes run. Admission is the caller's (before it decodes anything).
        Cancelling the caller drops a request still queued, and stops a running pass at its next
        chunk once none of its requests is left."""
        future: asyncio.Future[tuple[Any, PassInfo]] = asyncio.get_running_loop().create_future()
        pending = _Pending(
            key,
            item,
            images,
            batchable and self.max_images > 1,
            run,
            future,
            progress,
            priority,
            chunked,
            current_ticket(),
        )
        if pending.ticket is not None:
            pending.ticket.queued(pending, pending.fail)
        pending.tag = self._turns[priority].tag(pending.client, images)
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
            if pending.ticket is not None:
                pending.ticket.dequeued(pending)

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with a cancellation."""
        tasks = [t for t in (self._worker, *self._hosting) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
            if not self._eligible():
                self._forming = False
                if not await self._wait_for_arrival(_IDLE_EXIT_S):
                    if self._host is None and not self._queue:
                        return  # idle: the next submit starts a new worker
                continue
            group = await self._form_group()
            if not group:
                continue
            if self._host is not None and not group[0].chunked:
                # Runs at the host's next pause or boundary; until then the compatible requests
                # that arrive join it, and the others gather for the next group.
                started, seal = asyncio.Event(), _Seal()
                self._start(self._run_group(group, started=started, seal=seal))
                await self._join_until_started(group, seal, started)
            elif group[0].chunked:
                host = Host(group[0].priority, self.turns, self.on_yield, caller=group[0].client)
                self._host = host
                task = self._start(self._run_group(group, host=host))
                task.add_done_callback(partial(self._unhost, host))
            else:
                await self._run_group(group)
                # Whatever queued while that pass ran is a batch already forming.
                self._forming = any(p.live for p in self._queue)
            del group  # its requests hold their model: a model swapped out is freed now

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._hosting.add(task)
        task.add_done_callback(self._hosting.discard)
        return task

    def _unhost(self, host: Host, _task: object = None) -> None:
        if self._host is host:
            self._host = None
            self._arrived.set()  # a chunked pass may be waiting for the model

    async def _wait_for_arrival(self, timeout: float) -> bool:
        self._arrived.clear()
        # Not asyncio.wait_for: on Python 3.11 it can swallow a cancel that lands as the event
        # is set, and close() then waited out the whole idle timeout for this worker.
        waiter = asyncio.ensure_future(self._arrived.wait())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()
        return bool(done)

    def _started(self, pending: _Pending) -> None:
        """``pending`` left the queue for a pass: its turn in its class is taken."""
        pending.taken()
        self._turns[pending.priority].turn(pending.tag)

    def _eligible(self) -> list[_Pending]:
        """Live requests that may start now, in turn order (``_Pending.order``): while a
        chunked pass holds the model, a second chunked one waits for it to end."""
        live = [p for p in self._queue if p.live and not (self._host and p.chunked)]
        return sorted(live, key=lambda p: p.order)

    def _compatible(self, first: _Pending) -> list[_Pending]:
        return [first, *self._joiners([first])]

    def _joiners(self, group: list[_Pending]) -> list[_Pending]:
        """The eligible requests that may share ``group``'s pass, in turn order, as long as the
        pass stays within ``max_images``."""
        first = group[0]
        if not first.batchable:
            return []
        images = sum(p.images for p in group)
        joiners = []
        for other in self._eligible():
            if other in group or not (
                other.batchable and other.key == first.key and other.priority == first.priority
            ):
                continue
            if images + other.images > self.max_images:
                break
            joiners.append(other)
            images += other.images
        return joiners

    async def _form_group(self) -> list[_Pending]:
        eligible = self._eligible()
        if not eligible:
            return []
        first = eligible[0]
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
            self._started(pending)
        return group

    async def _join_until_started(
        self, group: list[_Pending], seal: _Seal, started: asyncio.Event
    ) -> None:
        """While ``group`` waits for its turn, the compatible requests that arrive join it."""
        while not started.is_set():
            self._arrived.clear()
            self._join(group, seal)
            arrival = asyncio.ensure_future(self._arrived.wait())
            start = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait({arrival, start}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrival.cancel()
                start.cancel()

    def _join(self, group: list[_Pending], seal: _Seal) -> None:
        """Move the queued requests that may share ``group``'s pass into it, unless its pass
        has started."""
        for other in self._joiners(group):
            with seal.lock:
                if seal.sealed:
                    return
                group.append(other)
            self._queue.remove(other)
            self._started(other)

    async def _run_group(
        self,
        group: list[_Pending],
        host: Host | None = None,
        started: asyncio.Event | None = None,
        seal: _Seal | None = None,
    ) -> None:
        outcome = await self._run(group, host, started, seal)
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

    async def _run(
        self,
        group: list[_Pending],
        host: Host | None = None,
        started: asyncio.Event | None = None,
        seal: _Seal | None = None,
    ) -> _Outcome:
        """One pass: as the model's ``host``, as a guest of the running host, or alone. An open
        ``seal``: requests may join ``group`` until the pass starts."""
        loop = asyncio.get_running_loop()

        def work() -> tuple[float, Sequence[Any]]:
            began = time.perf_counter()
            if seal is not None:
                seal.close()  # the group is final from here on
            fit = None if self.fit is None else partial(self.fit, group[0].priority)
            control = PassControl(group, host, fit)
            if fit is not None:
                fit()
            if started is not None:
                loop.call_soon_threadsafe(started.set)
            try:
                if control.should_stop():  # every caller left while the pass waited for its turn
                    raise CamInterrupted("every request of the pass was cancelled")
                control.progress(0, 0)  # the pass has started; its size is the method's to say
                return began, group[0].run([p.item for p in group], control)
            finally:
                if host is not None:
                    host.close()  # passes offered too late run on their own

        outcome: tuple[float, Sequence[Any]] | Exception | None = None
        guest = host is None and self._host is not None and not group[0].chunked
        if guest:
            assert self._host is not None
            outcome = await self._as_guest(self._host, group, work)
            guest = outcome is not None
        if outcome is None:  # alone, as the host, or declined by a host that ended
            try:
                outcome = await self.limiter.run_in_slot(work, self.executor)
            except Exception as error:  # handed to the requests, which turn it into their answer
                outcome = error
            finally:
                if host is not None:
                    host.close()
                if started is not None:
                    started.set()
        if isinstance(outcome, Exception):
            return outcome
        _observe(self.on_pass, sum(p.images for p in group), time.perf_counter() - outcome[0])
        return outcome[0], outcome[1], guest

    @staticmethod
    async def _as_guest(
        host: Host, group: list[_Pending], work: Callable[[], tuple[float, Sequence[Any]]]
    ) -> tuple[float, Sequence[Any]] | Exception | None:
        """``work``'s outcome once ``host`` ran it (at a pause or boundary); None if the host
        ended first. ``group`` may grow until ``work`` starts."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[float, Sequence[Any]] | Exception | None]
        done = loop.create_future()

        def deliver(outcome: tuple[float, Sequence[Any]] | Exception | None) -> None:
            if not done.done():
                done.set_result(outcome)

        def run() -> None:  # on the host's thread
            outcome: tuple[float, Sequence[Any]] | Exception
            try:
                outcome = work()
            except Exception as error:
                outcome = error
            loop.call_soon_threadsafe(deliver, outcome)

        def decline() -> None:
            loop.call_soon_threadsafe(deliver, None)

        def callers() -> list[str]:
            return [pending.client for pending in group]

        guest = Guest(group[0].priority, run, decline, group.__len__, callers)
        if not host.offer(guest):
            return None
        # Not abandoned on cancel: the host may be running it, and delivers its outcome anyway.
        return await asyncio.shield(done)

    def _settle(self, group: list[_Pending], outcome: _Outcome) -> None:
        if isinstance(outcome, Exception):
            for pending in group:
                if pending.live:
                    pending.future.set_exception(outcome)
            return
        started, results, guest = outcome
        images = sum(p.images for p in group)
        for pending, result in zip(group, results, strict=True):
            if pending.live:
                info = PassInfo(started - pending.submitted, images, guest)
                _observe(self.on_wait, pending.priority, info.queue_s)
                pending.future.set_result((result, info))


_Outcome = tuple[float, Sequence[Any], bool] | Exception
"""(start time, one result per item, whether it ran as a guest), or the error the pass raised."""


def _observe(observer: Callable[..., None] | None, *args: Any) -> None:
    """Tell an observer (the metrics) what happened; one that fails is logged, never allowed to
    break the pass or leave its requests waiting."""
    if observer is None:
        return
    try:
        observer(*args)
    except Exception:
        logger.exception("an observer of the batcher failed")
