"""Turns shared fairly among clients: fair queueing by virtual finish tags.

Each waiter has a *cost* (an image of a pass; a byte of a memory budget). When it starts to wait
it *starts*, in virtual time, at the later of where its client's previous waiter ends and where
the last waiter served ends (the *clock*), and its *tag* is where it ends: that start plus its
cost. Waiters go in tag order, the oldest first among equal tags. So turns go round robin among
the clients that wait, weighed by what each asks for: a client with thirty requests waiting delays
another client's next one by at most one of its own, a small request goes before a large one
that started with it (the large one's turn still comes: the clock passes its tag), and a client
that was idle gets no credit for it (its next waiter starts at the clock).

One exception keeps a request that works step after step (decode, then draw a canvas, then a
picture) in the round: when its step ends, the thread goes at once to the next waiter in turn,
and the clock moves past that waiter's tag before the request's next step can ask. Started
from there, the next step would also wait behind that client's following one: a request would
get one step in three beside a flood, not one in two. So a client whose last holder *left*
(``left``) and who asks again before a second turn is given starts where the clock was when it
left: no more credit than the one turn given in between.

Used by a model's batcher for its queue (``app.pipeline.batching``) and by the memory budgets
that decoding and drawing wait for (``app.pipeline.budget``). A request's client is
``app.observability.context.RequestInfo.caller``: its API key's name, or its address.
"""

from __future__ import annotations

from app.observability.context import current_request


def current_caller() -> str:
    """The current request's client (empty outside a request: the CLI's local pipeline)."""
    info = current_request()
    return info.caller if info is not None else ""


class FairTurns:
    """The tags of one queue (not thread-safe: used from the event loop)."""

    _SMALLEST_PRUNE = 64

    def __init__(self) -> None:
        self._clock = 0
        self._ends: dict[str, int] = {}
        """Where each client's last waiter ends. An end the clock has passed counts as none, and
        such entries are dropped whenever the table has doubled since the last drop: so it
        holds about the clients with waiters, or served just now, however many clients come,
        at a constant cost a turn."""
        self._prune_at = self._SMALLEST_PRUNE
        self._given = 0
        """Turns given so far."""
        self._left: dict[str, tuple[int, int]] = {}
        """Clients whose holder left just now: the clock and the turns given when it left."""

    def tag(self, client: str, cost: int = 1) -> int:
        """A new waiter's tag: where it ends, starting at the later of the clock and the end of
        its client's last one (or of the clock when its last holder left, one turn ago at most)."""
        clock = self._clock
        left = self._left.pop(client, None)
        if left is not None and self._given - left[1] <= 1:
            clock = left[0]
        tag = max(clock, self._ends.get(client, 0)) + max(1, cost)
        self._ends[client] = tag
        if len(self._ends) >= self._prune_at:
            self._ends = {client: end for client, end in self._ends.items() if end > self._clock}
            self._prune_at = max(self._SMALLEST_PRUNE, 2 * len(self._ends))
        return tag

    def turn(self, tag: int) -> None:
        """The waiter tagged ``tag`` got its turn: the clock moves on to where it ends."""
        self._clock = max(self._clock, tag)
        self._given += 1
        if self._left:  # only the clients that left one turn ago at most are kept
            self._left = {c: at for c, at in self._left.items() if self._given - at[1] <= 1}

    def left(self, client: str) -> None:
        """``client``'s holder ended its turn (before the next waiter is given one)."""
        self._left[client] = (self._clock, self._given)

    @property
    def remembered(self) -> int:
        """Clients in the tables (for tests: they stay bounded)."""
        return len(self._ends) + len(self._left)
