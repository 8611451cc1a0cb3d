"""Turns shared fairly among clients: start-time fair queueing.

Each waiter has a *cost* (an image of a pass; a byte of a memory budget) and is *tagged* when it
starts to wait with the later of two times: where its client's previous waiter ends (that one's
tag plus its cost) and where the last waiter that got its turn ends (the *clock*). Waiters go in
tag order, the oldest first among equal tags. So turns go round robin among the clients
that wait, weighed by what each asks for: a client with thirty requests waiting delays another
client's next one by at most one of its own, a small request is not made to wait as long as a
large one, and a client that was idle gets no credit for it (its next tag is the clock).

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

    def __init__(self) -> None:
        self._clock = 0
        self._ends: dict[str, int] = {}
        """Where each client's last waiter ends (its tag plus its cost), while past the clock:
        so it holds only clients with waiters, or served just now, however many clients come."""

    def tag(self, client: str, cost: int = 1) -> int:
        """A new waiter's tag: the later of the clock and the end of its client's last one."""
        tag = max(self._clock, self._ends.get(client, 0))
        self._ends[client] = tag + max(1, cost)
        return tag

    def turn(self, tag: int, cost: int = 1) -> None:
        """The waiter tagged ``tag`` (of ``cost``) got its turn: the clock moves on to where it
        ends, and the clients whose last waiter ends before that are forgotten."""
        end = tag + max(1, cost)
        if end > self._clock:
            self._clock = end
            self._ends = {client: last for client, last in self._ends.items() if last > end}
