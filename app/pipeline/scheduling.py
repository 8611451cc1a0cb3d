"""Who runs next on a model while a chunked pass holds it: turns at boundaries and pauses.

A *chunked* pass (the Score-CAM family, Ablation-CAM, SmoothGrad-CAM++) is a hooked forward
followed by chunks of masked, ablated or noisy forwards. While it runs, it is the model's *host*:
the other passes for that model (short ones: a forward, or a forward and a backward) are offered
to it as *guests*, and the host runs them on its own thread at its next chunk boundary or pause
(below), then resumes. No second thread and no second slot touch the model, and each pass runs
in its own hook scope (``app.cam.core.hook_scope``), so activations never cross between passes.

The host also *pauses* inside its chunks' forwards, before each of the model's leaf modules
(``app.cam.core.Work.pause_points``): a guest whose turn comes before the host's runs there, so
that a short pass waits for one layer of a chunk rather than the whole chunk. The host's own turn
is counted at its boundaries only, so the starvation guard below still gives a background host
at least one whole chunk in every ``background_every`` turns.

At a boundary (and at a pause) every waiting pass, the host's next chunk included, asks for a
*turn*:

- interactive work (``/explain``, ``/predict``, the protocol routes) goes before background work
  (``/jobs``);
- within a class, turns go in the order they were asked for (the host asks for its next one at
  the boundary, so the guests that were waiting then go first when they are of its class);
- the starvation guard: while background work waits, at least one turn in every
  ``background_every`` goes to it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Priority = Literal["interactive", "background"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "background")
_RANK: dict[Priority, int] = {"interactive": 0, "background": 1}
_asked = itertools.count()
"""The order in which turns were asked for, over every model (only ever compared per model)."""


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
    asked: int = -1
    """When it asked for its turn: set when it is offered."""


class Host:
    """The model while a chunked pass holds it (thread-safe).

    The batcher ``offer``s passes from the event loop; the host's thread calls ``boundary()``
    between two of its chunks and ``close()`` when it ends."""

    def __init__(
        self,
        priority: Priority,
        background_every: int,
        on_yield: Callable[[], None] | None = None,
        *,
        pauses: bool = True,
    ) -> None:
        if background_every < 2:
            raise ValueError(f"background_every must be >= 2, got {background_every!r}.")
        self.priority = priority
        self.background_every = background_every
        self.on_yield = on_yield
        """Told every time the host let at least one guest run (at a boundary or a pause)."""
        self.pauses = pauses
        """Whether guests run at the pauses inside the host's chunks (else at boundaries only)."""
        self.yields = 0
        self._lock = threading.Lock()
        self._guests: list[Guest] = []
        self._closed = False
        self._interactive_turns = 0
        """Turns interactive work took in a row while background work waited."""

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
        if self.pauses and self._guests:
            self._serve(pause=True)

    def _serve(self, pause: bool) -> None:
        own = next(_asked)
        if not pause and self.priority == "background":
            with self._lock:
                self._interactive_turns = 0  # its chunk, a background turn, has just ended
        served = 0
        while (guest := self._next_guest(own, pause)) is not None:
            served += 1
            guest.run()
        if served:
            self.yields += 1
            if self.on_yield is not None:
                self.on_yield()

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
        """The guest whose turn is next, taken off the queue; None: the host's own turn.

        The host's turn is its next whole chunk. A background host's is counted when the chunk
        ends (``_serve`` at a boundary), so that the guests served at that boundary and at the
        pauses of the next chunk are N - 1 at most together; an interactive host's is counted
        when it is chosen at a boundary. At a pause the host merely goes on with its chunk."""
        with self._lock:
            if not self._guests:
                if not pause:
                    self._took(self.priority, background_waits=False)
                return None
            turns: list[tuple[Priority, int, Guest | None]] = [
                (g.priority, g.asked, g) for g in self._guests
            ]
            turns.append((self.priority, own, None))
            background = [t for t in turns if t[0] == "background"]
            if background and self._interactive_turns >= self.background_every - 1:
                chosen = min(background, key=lambda t: t[1])
            else:
                chosen = min(turns, key=lambda t: (_RANK[t[0]], t[1]))
            guest = chosen[2]
            if guest is None:
                if not pause and self.priority == "interactive":
                    self._took(self.priority, background_waits=bool(background))
                return None
            self._took(chosen[0], background_waits=bool(background))
            self._guests.remove(guest)
            return guest

    def _took(self, priority: Priority, background_waits: bool) -> None:
        if priority == "interactive" and background_waits:
            self._interactive_turns += 1
        else:
            self._interactive_turns = 0
