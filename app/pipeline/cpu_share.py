"""How many intra-op threads a pass may take: every core while nothing else of the service runs
on the CPU, only the cores the rest leaves free otherwise (at least one).

torch runs a CPU pass's operators on an OpenMP team of ``torch.get_num_threads()`` threads, and
every operator ends at a barrier where the team waits for its slowest thread. While another of
the service's threads draws a picture, decodes an upload or runs another model's pass, a team
as wide as the machine has a thread that must wait for a core at every barrier. Measured on 2
cores (bench/hostile_mix.py, the render attacker alone, the shapes model): the good requests'
forward, 2 ms at its median, took 65-85 ms at its p95 with a team of 2, and 14 ms with a team
of 1; beside no other work, a team of 2 runs resnet50's forward in 70 ms, a team of 1 in 120.

So the service counts the CPU work it has in flight: every task its decoding, drawing and model
threads run (``CountedThreads``). An interactive pass sets its own thread's team (``fit``) when
it starts, to the cores less the other work in flight. A background pass (a job) does the same
at each chunk boundary and pause (after the interactive passes it ran there as guests, which
sized the thread for themselves), but counts only the tasks that have run for ``LASTING_S``: it
gives a core to a drawing of seconds or another pass, not to a request's few milliseconds of
decoding or drawing. Narrowed beside every task, a Score-CAM job on resnet18 grew 1.31x beside
GradCAM at concurrency 1 instead of 1.19x (``bench/service_load.py --scenario mixed``; its
target is 1.25x) and the requests gained nothing; never narrowed, or narrowed only beside two
tasks or more, a job beside the hostile mix's drawings stalled at its barriers, its pauses came
late, and the good clients' p95 went to 1.8-7.9x alone (``bench/hostile_mix.py``).
``torch.set_num_threads`` is per thread for the OpenMP teams and costs well under a
microsecond; the widest team is what torch had at startup (``OMP_NUM_THREADS`` sets it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from app.pipeline.scheduling import Priority

T = TypeVar("T")


#: How long another task must have run before a background pass gives up a core to it.
LASTING_S = 0.05


class CpuShare:
    """The service's CPU work in flight (thread-safe), and the team a pass may take."""

    def __init__(
        self,
        cores: int | None = None,
        *,
        fit_teams: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = max(1, cores if cores is not None else torch.get_num_threads())
        """The widest team: the intra-op threads torch had at startup."""
        self.fit_teams = fit_teams
        """Whether passes fit their teams (``CAMSERVE_FIT_PASS_THREADS``); else they keep
        torch's threads."""
        self.clock = clock
        self._started: dict[int, float] = {}
        """When the task that each counted thread runs now started, by thread."""
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        """Tasks of the counted threads running now."""
        return len(self._started)

    def counting(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``func`` counted as CPU work in flight."""
        thread = threading.get_ident()
        with self._lock:
            self._started[thread] = self.clock()
        try:
            return func(*args, **kwargs)
        finally:
            with self._lock:
                del self._started[thread]

    def team(self, priority: Priority = "interactive") -> int:
        """The threads a pass running now on the calling thread may use: the cores less the
        other counted tasks in flight, at least one. A background pass counts only the tasks
        that have run for ``LASTING_S`` or more."""
        me = threading.get_ident()
        least = LASTING_S if priority == "background" else 0.0
        now = self.clock()
        with self._lock:
            others = sum(1 for th, t in self._started.items() if th != me and now - t >= least)
        return max(1, self.cores - others)

    def fit(self, priority: Priority = "interactive") -> None:
        """Size the calling thread's team for the pass it runs (a no-op when it has that size)."""
        wanted = self.team(priority)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)


class CountedThreads(ThreadPoolExecutor):
    """A thread pool whose tasks count as CPU work in flight in ``share``."""

    def __init__(self, share: CpuShare, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.share = share

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(self.share.counting, fn, *args, **kwargs)


def fit_of(executor: Any) -> Callable[[Priority], None] | None:
    """The ``fit`` of the share that counts ``executor``'s tasks (None: not counted, or a share
    whose passes keep torch's threads as they are)."""
    if isinstance(executor, CountedThreads) and executor.share.fit_teams:
        return executor.share.fit
    return None
