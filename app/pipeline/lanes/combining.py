"""One call for the work of several threads: the JPEG decodes of concurrent requests.

A thread that finds no call running becomes the leader: it runs every queued item in one call,
then the items that arrived meanwhile in the next, until none is left. The others wait for
their results. No timer: while one call runs, the next one fills, as the batcher's passes do,
so the requests that the batcher gathers into one pass had their images decoded together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(eq=False)
class _Entry(Generic[In, Out]):
    items: Sequence[In]
    done: threading.Event = field(default_factory=threading.Event)
    results: list[Out] | None = None
    error: BaseException | None = None


class Combiner(Generic[In, Out]):
    """Runs ``run`` (items -> one result per item) over the items of concurrent ``submit``s."""

    def __init__(self, run: Callable[[list[In]], list[Out]], max_items: int = 64) -> None:
        self.run = run
        self.max_items = max_items
        self._queue: list[_Entry[In, Out]] = []
        self._lock = threading.Lock()
        self._leading = False
        self.calls: list[int] = []
        """Items per call made (the tests and the bench read it)."""

    def submit(self, items: Sequence[In]) -> list[Out]:
        if not items:
            return []
        entry: _Entry[In, Out] = _Entry(items)
        with self._lock:
            self._queue.append(entry)
            lead = not self._leading
            self._leading = True
        if lead:
            self._lead()
        entry.done.wait()
        if entry.error is not None:
            raise entry.error
        assert entry.results is not None
        return entry.results

    def _lead(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
                if not batch:
                    self._leading = False
                    return
            items = [item for entry in batch for item in entry.items]
            try:
                results = self.run(items)
                self.calls.append(len(items))
                start = 0
                for entry in batch:
                    entry.results = list(results[start : start + len(entry.items)])
                    start += len(entry.items)
            except BaseException as error:  # every waiter learns it; the leader goes on
                for entry in batch:
                    entry.error = error
            for entry in batch:
                entry.done.set()

    def _next_batch(self) -> list[_Entry[In, Out]]:
        batch: list[_Entry[In, Out]] = []
        count = 0
        while self._queue and (not batch or count + len(self._queue[0].items) <= self.max_items):
            entry = self._queue.pop(0)
            batch.append(entry)
            count += len(entry.items)
        return batch
