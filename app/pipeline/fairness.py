"""Turns shared fairly among clients: start-time fair queueing, every request one turn.

A request is *tagged* when it starts to wait: one more than the later of its client's last tag
and the tag of the last request that got its turn (the *clock*). Waiters go in tag order, the
oldest first among equal tags. So turns go round robin among the clients that wait: a client
with thirty requests waiting delays another client's next one by at most one of its own, and a
client that was idle gets no credit for it (its next tag starts from the clock).

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
        self._last: dict[str, int] = {}
        """Each client's last tag, while it is above the clock (below it, the clock decides)."""

    def tag(self, client: str) -> int:
        """A new waiter's tag: one after the later of its client's last one and the clock."""
        tag = max(self._clock, self._last.get(client, 0)) + 1
        self._last[client] = tag
        return tag

    def turn(self, tag: int) -> None:
        """The waiter tagged ``tag`` got its turn: the clock moves on to it."""
        if tag > self._clock:
            self._clock = tag
            self._last = {client: last for client, last in self._last.items() if last > tag}
