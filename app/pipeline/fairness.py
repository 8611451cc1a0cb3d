"""Turns shared fairly among clients: fair queueing by virtual finish tags.

Each waiter has a *cost* (an image of a pass; a byte of a memory budget). When it starts to wait
it *starts*, in virtual time, at the later of where its client's previous waiter ends and where
the last waiter served ends (the *clock*), and its *tag* is where it ends: that start plus its
cost. Waiters go in tag order, the oldest first among equal tags. So turns go round robin among
the clients that wait, weighed by what each asks for: a client with thirty requests waiting delays
another client's next one by at most one of its own, a small request goes before a large one
that started with it (the large one's turn still comes: the clock passes its tag), and a client
that was idle gets no credit for it (its next waiter starts at the clock).

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

    def tag(self, client: str, cost: int = 1) -> int:
        """A new waiter's tag: where it ends, starting at the later of the clock and the end of
        its client's last one."""
        tag = max(self._clock, self._ends.get(client, 0)) + max(1, cost)
        self._ends[client] = tag
        if len(self._ends) >= self._prune_at:
            self._ends = {client: end for client, end in self._ends.items() if end > self._clock}
            self._prune_at = max(self._SMALLEST_PRUNE, 2 * len(self._ends))
        return tag

    def turn(self, tag: int) -> None:
        """The waiter tagged ``tag`` got its turn: the clock moves on to where it ends."""
        self._clock = max(self._clock, tag)

    @property
    def remembered(self) -> int:
        """Clients in the table (for tests: it stays bounded)."""
        return len(self._ends)
