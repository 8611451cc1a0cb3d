"""Concurrent submissions share calls; each gets its own results, or the call's error."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.pipeline.lanes.combining import Combiner


def test_waiting_submissions_run_in_one_call() -> None:
    release = threading.Event()
    started = threading.Event()

    def run(items: list[int]) -> list[int]:
        if items == [0]:
            started.set()
            release.wait(5)
        return [i * 10 for i in items]

    combiner: Combiner[int, int] = Combiner(run)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(combiner.submit, [0])
        started.wait(5)
        later = [pool.submit(combiner.submit, [i, i + 100]) for i in (1, 2, 3)]
        while len(combiner._queue) < 3:
            threading.Event().wait(0.001)
        release.set()
        assert first.result() == [0]
        assert [f.result() for f in later] == [[10, 1010], [20, 1020], [30, 1030]]
    assert combiner.calls == [1, 6]


def test_an_error_reaches_every_caller_of_the_call_and_the_next_call_runs() -> None:
    def run(items: list[int]) -> list[int]:
        if -1 in items:
            raise RuntimeError("bad batch")
        return items

    combiner: Combiner[int, int] = Combiner(run)
    with pytest.raises(RuntimeError, match="bad batch"):
        combiner.submit([1, -1])
    assert combiner.submit([2]) == [2]
    assert combiner.submit([]) == []


def test_calls_hold_at_most_max_items() -> None:
    combiner: Combiner[int, int] = Combiner(lambda items: items, max_items=2)
    for entry in ([1], [2], [3, 4]):
        combiner._queue.append(
            __import__("app.pipeline.lanes.combining", fromlist=["_Entry"])._Entry(entry)
        )
    assert [len(e.items) for e in combiner._next_batch()] == [1, 1]
    assert [len(e.items) for e in combiner._next_batch()] == [2]
