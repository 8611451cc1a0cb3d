"""Who runs next on a model while a chunked pass holds it: turns at boundaries and pauses.

A *chunked* pass (the Score-CAM family, Ablation-CAM, SmoothGrad-CAM++) is a hooked forward
followed by chunks of masked, ablated or noisy forwards. While it runs, it is the model's *host*:
the other passes for that model (short ones: a forward, or a forward and a backward) are offered
to it as *guests*, and the host runs them on its own thread at its next chunk boundary or pause
(below), then resumes. No second thread and no second slot touch the model, and each pass runs
in its own hook scope (``app.cam.core.hook_scope``), so activations never cross between passes.

The host also *pauses* inside its chunks' forwards, before each of the model's leaf modules
(``app.cam.core.Work.pause_points``): a guest whose turn comes before the host's runs there, so
that a short pass waits for one layer of a chunk rather than the whole chunk.

At a boundary (and at a pause) every waiting pass, the host's next chunk included, asks for a
*turn*:

- interactive work (``/explain``, ``/predict``, the protocol routes) goes before background work
  (``/jobs``);
- within a class, turns go in the order they were asked for (the host asks for its next one at
  the boundary, so the guests that were waiting then go first when they are of its class);
- a **background host keeps its share of the model's time**: while interactive guests wait, it
  goes on until it has run ``background_share / (1 - background_share)`` times as long as the
  interactive guests that ran since it last caught up (0.85: 5.7 times as long), then the next
  guest runs at its next pause. Its time is counted in seconds at its pauses and boundaries, not
  in chunks: a guest waits for the host's slice (a few times its own pass), never for the rest of
  a chunk that is long on a slow device. What the host ran while nobody waited is no credit, and
  the host is never owed more than its longest chunk so far: after a long guest (a large batch)
  the next one waits no longer than when a turn was a whole chunk.
  Against the requests of *other* clients than the job's (``app.pipeline.fairness``) the job
  keeps at most an equal share (``OTHERS_SHARE``): one client's jobs take no more of a model
  from the others' requests than those requests take;
- the starvation guard of an **interactive host**: while background guests wait, at least one
  turn in every ``background_every`` goes to them (the host's turn being its next whole chunk).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

Priority = Literal["interactive", "background"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "background")
_RANK: dict[Priority, int] = {"interactive": 0, "background": 1}
_asked = itertools.count()
"""The order in which turns were asked for, over every model (only ever compared per model)."""
OTHERS_SHARE = 0.5
"""A job's most share of its model against other clients' requests: an equal one."""
_PAID_S = 1e-6
"""Time still owed to a background host that counts as paid (what float rounding leaves)."""


@dataclass(frozen=True)
class TurnRules:
    """How a chunked pass shares its model with the passes offered to it (the settings
    ``CAMSERVE_BACKGROUND_EVERY``, ``CAMSERVE_BACKGROUND_SHARE`` and
    ``CAMSERVE_PAUSE_IN_FORWARDS``)."""

    background_every: int = 3
    """An interactive host: while background guests wait, one turn in this many is theirs."""
    background_share: float = 0.85
    """A background host: its least share of the model's time while its own client's
    interactive guests wait (against other clients' at most ``OTHERS_SHARE``)."""
    pauses: bool = True
    """Whether guests run at the pauses inside the host's chunks (else at boundaries only)."""

    def __post_init__(self) -> None:
        if self.background_every < 2:
            raise ValueError(f"background_every must be >= 2, got {self.background_every!r}.")
        if not 0.0 <= self.background_share < 1.0:
            raise ValueError(f"background_share must be in [0, 1), got {self.background_share!r}.")


@dataclass(eq=False)
class Guest:
    """A pass waiting for a host's chunk boundary."""

    priority: Priority
    run: Callable[[], None]
    """Runs the pass on the host's thread; it delivers its own outcome and must not raise."""
    decline: Callable[[], None]
    """Told that the host ended before the pass could run (it then runs elsewhere)."""
    requests: Callable[[], int] = lambda: 1
    """How many requests the pass answers now (for the queue gauge; a waiting guest may grow)."""
    callers: Callable[[], Collection[str]] = lambda: ()
    """The clients of its requests when it runs (``app.pipeline.fairness``)."""
    asked: int = -1
    """When it asked for its turn: set when it is offered."""


class Host:
    """The model while a chunked pass holds it (thread-safe).

    The batcher ``offer``s passes from the event loop; the host's thread calls ``boundary()``
    between two of its chunks and ``close()`` when it ends."""

    def __init__(
        self,
        priority: Priority,
        rules: TurnRules = TurnRules(),
        on_yield: Callable[[], None] | None = None,
        *,
        caller: str = "",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.priority = priority
        self.rules = rules
        self.caller = caller
        """The client whose pass it is (empty: unknown, every guest counts as its own)."""
        self.on_yield = on_yield
        """Told every time the host let at least one guest run (at a boundary or a pause)."""
        self.yields = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._guests: list[Guest] = []
        self._closed = False
        self._interactive_turns = 0
        """An interactive host: turns interactive work took in a row while background work
        waited."""
        self._owed = 0.0
        """A background host: seconds of the model's time still owed to background work for the
        interactive guests that ran (never below 0: running alone is no credit; never above its
        longest chunk)."""
        self._resumed = clock()
        """When the host last went on with its own work."""
        self._chunk_s = 0.0
        """The host's own seconds since its last boundary."""
        self._longest_chunk_s = 0.0
        """Its longest chunk so far, in its own seconds (0: none seen)."""

    @property
    def waiting(self) -> int:
        """Requests of the guests waiting for a boundary."""
        with self._lock:
            return sum(guest.requests() for guest in self._guests)

    def offer(self, guest: Guest) -> bool:
        """Queue ``guest`` for the next boundary; False once the host has ended."""
        with self._lock:
            if self._closed:
                return False
            guest.asked = next(_asked)
            self._guests.append(guest)
            return True

    def boundary(self) -> None:
        """Between two chunks, on the host's thread: run the guests whose turn comes before the
        host's next chunk."""
        self._serve(pause=False)

    def pause(self) -> None:
        """Inside a chunk's forward, on the host's thread: run the guests whose turn comes before
        the rest of the chunk (a cheap no-op while none waits)."""
        if self.rules.pauses and self._guests:
            self._serve(pause=True)

    def _serve(self, pause: bool) -> None:
        own = next(_asked)
        if self.priority == "background":
            ran = self._clock() - self._resumed
            self._chunk_s += ran
            if not pause:
                self._longest_chunk_s = max(self._longest_chunk_s, self._chunk_s)
                self._chunk_s = 0.0
            self._spent("background", ran)
        served = 0
        while (guest := self._next_guest(own, pause)) is not None:
            served += 1
            began = self._clock()
            guest.run()
            self._spent(guest.priority, self._clock() - began, guest.callers())
        self._resumed = self._clock()
        if served:
            self.yields += 1
            if self.on_yield is not None:
                self.on_yield()

    def _spent(self, priority: Priority, seconds: float, callers: Collection[str] = ()) -> None:
        """Count ``seconds`` of the model's time used by ``priority`` work of ``callers`` (a
        background host's share)."""
        if self.priority != "background":
            return
        with self._lock:
            if priority == "interactive":
                share = self.rules.background_share
                if self.caller and any(caller != self.caller for caller in callers):
                    share = min(share, OTHERS_SHARE)  # fair among clients
                self._owed += seconds * share / (1.0 - share)
                if self._longest_chunk_s > 0.0:  # no longer than a whole chunk made a guest wait
                    self._owed = min(self._owed, self._longest_chunk_s)
            else:
                left = self._owed - seconds
                self._owed = left if left > _PAID_S else 0.0

    def close(self) -> list[Guest]:
        """End the host: later offers are refused; the guests still waiting are declined (and
        returned)."""
        with self._lock:
            self._closed = True
            left, self._guests = self._guests, []
        for guest in left:
            guest.decline()
        return left

    def _next_guest(self, own: int, pause: bool = False) -> Guest | None:
        """The guest whose turn is next, taken off the queue; None: the host's own turn (it goes
        on with its chunk, or starts the next one)."""
        with self._lock:
            if self.priority == "background":
                return self._next_of_background_host(own)
            if not self._guests:
                if not pause:
                    self._took(self.priority, background_waits=False)
                return None
            turns: list[tuple[Priority, int, Guest | None]] = [
                (g.priority, g.asked, g) for g in self._guests
            ]
            turns.append((self.priority, own, None))
            background = [t for t in turns if t[0] == "background"]
            if background and self._interactive_turns >= self.rules.background_every - 1:
                chosen = min(background, key=lambda t: t[1])
            else:
                chosen = min(turns, key=lambda t: (_RANK[t[0]], t[1]))
            guest = chosen[2]
            if guest is None:
                # An interactive host's turn is its next whole chunk: counted when chosen at a
                # boundary (going on at a pause is not a turn).
                if not pause:
                    self._took(self.priority, background_waits=bool(background))
                return None
            self._took(chosen[0], background_waits=bool(background))
            self._guests.remove(guest)
            return guest

    def _next_of_background_host(self, own: int) -> Guest | None:
        """A background host's choice (under the lock): the interactive guest that asked first,
        unless the host is owed time; then the background guests that asked before the host."""
        interactive = [g for g in self._guests if g.priority == "interactive"]
        if interactive and self._owed <= 0.0:
            guest = min(interactive, key=lambda g: g.asked)
        else:
            background = [g for g in self._guests if g.priority == "background" and g.asked < own]
            if not background:
                return None
            guest = min(background, key=lambda g: g.asked)
        self._guests.remove(guest)
        return guest

    def _took(self, priority: Priority, background_waits: bool) -> None:
        if priority == "interactive" and background_waits:
            self._interactive_turns += 1
        else:
            self._interactive_turns = 0
