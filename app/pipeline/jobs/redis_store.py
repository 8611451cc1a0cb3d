"""The Redis job store (``CAMSERVE_JOB_STORE=redis://host:port/db`` or ``rediss://``): every
replica creates, reads, follows and cancels any job, and runs jobs from one shared queue.

- The queue is a stream (``camserve:jobs:queue``) read by the consumer group ``camserve-workers``:
  each replica has one consumer with one reader per model slot, so a replica takes a job only
  when a slot is free. A running job's entry stays pending; its reader re-claims it (``XCLAIM``)
  every third of ``lease_s`` to show that it lives. An entry idle longer than ``lease_s`` (its
  replica died) is taken over by another replica (``XAUTOCLAIM``) and run again from the start,
  at most ``max_attempts`` times in all.
- A job is a hash ``camserve:job:{id}`` (status, the JSON view, result, owner, attempts), its
  input a hash ``camserve:job:{id}:input`` (deleted once it ends) and its events a stream
  ``camserve:job:{id}:events`` (progress, then the final status; the stream ids are the SSE ids).
  Finished jobs expire after ``ttl_s``; unfinished ones a day after their last change.
- ``camserve:jobs:active`` (id -> "status|client") counts queued and running jobs for admission;
  ``camserve:jobs:finished`` (sorted by end time) keeps at most ``max_jobs`` finished jobs.
- A cancel marks the job cancelled; the replica that runs it sees that when it writes its next
  progress (after every chunk) and stops the pass.
- Redis down: requests that need it answer 503 ``job_store_unavailable`` within ``op_timeout_s``;
  a watcher pings Redis every second or two and everything resumes when it answers again.
- Redis refusing this replica (a missing or wrong password, no database of the URL's index, a
  server that is no Redis: ``redis_refusal``) stops startup with a ConfigurationError naming the
  setting to fix; when it happens later, the 503s name the cause and the fix, not "does not
  answer".
- The connection pools are sized above what this replica may use at once (``max_streams``
  event streams, one reader per slot, and room for the request path). A full pool all the same
  ("Too many connections") is not Redis being down: that request gets 503 ``overloaded``
  with Retry-After, and the store stays available for every other one.

Each change that needs several keys is one Lua script (``redis_scripts``), so two replicas never
see half of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast, get_args

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.errors import JobCancelled, JobNotFound, JobStoreUnavailable, Overloaded
from app.lifecycle import Lifecycle
from app.observability.logs import Throttle
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.jobs.base import JobEvent, JobStore, StoreState
from app.pipeline.jobs.record import FINISHED, Job, new_job_id
from app.pipeline.jobs.redis_refusal import STORE, Refusal, Target, refusal
from app.pipeline.jobs.redis_scripts import SCRIPTS
from app.pipeline.jobs.work import (
    Outcome,
    check_result_size,
    params_from_json,
    params_to_json,
    run_job,
)
from app.pipeline.results import ErrorDetail, ExplainResponse, JobStatus, JobView
from app.settings import ConfigurationError

logger = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "camserve:job:"
QUEUE = "camserve:jobs:queue"
GROUP = "camserve-workers"
ACTIVE = "camserve:jobs:active"
FINISHED_SET = "camserve:jobs:finished"
UNFINISHED_TTL_S = 86_400
#: A consumer of the queue with nothing pending and idle this long is deleted (a replica that
#: died leaves its consumer behind, one per start; a live replica's next read makes its own
#: again, even one that waits in Redis at the time).
CONSUMER_IDLE_MS = 600_000
EVENTS_KEPT = 200
RETRY_AFTER_S = 5
_READ_BLOCK_MS = 1000
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STREAM_ID_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_STREAM_ID_MAX = 2**64 - 1  # each half of a stream id is an unsigned 64-bit number
#: Connections of a pool beyond the event streams and the readers: the request path's commands.
_POOL_ROOM = 64
#: What a lost connection looks like (AuthenticationError and BusyLoadingError are among them).
_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, asyncio.TimeoutError)


def _aw(value: object) -> Awaitable[Any]:
    """redis-py types its asyncio methods as ``X | Awaitable[X]``; they are awaitables."""
    return cast("Awaitable[Any]", value)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _record(job_id: str) -> str:
    return PREFIX + job_id


def _input(job_id: str) -> str:
    return PREFIX + job_id + ":input"


def _events(job_id: str) -> str:
    return PREFIX + job_id + ":events"


def _state(job: Job) -> str:
    """The data of a ``progress`` event."""
    return job.view(with_result=False).model_dump_json(include={"status", "progress"})


@dataclass(eq=False)
class _Running:
    """A job this replica runs: its task, its queue entry, and why it was stopped (if so)."""

    job: Job
    entry: str
    task: asyncio.Task[Outcome]
    stopped: str = ""
    """'' while it runs; 'cancelled', 'lost' or 'handed back' once stopped from outside."""


class RedisJobStore(JobStore):
    """Jobs in Redis, run by whichever replica has a free slot."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        explainer: Explainer,
        lifecycle: Lifecycle,
        *,
        max_jobs: int,
        ttl_s: float,
        max_per_client: int | None = None,
        password: str | None = None,
        lease_s: float = 30.0,
        max_attempts: int = 3,
        max_result_bytes: int = 8 * 1024 * 1024,
        op_timeout_s: float = 3.0,
        max_streams: int = 256,
    ) -> None:
        super().__init__(max_jobs, ttl_s, max_per_client)
        self.explainer = explainer
        self.lifecycle = lifecycle
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.max_result_bytes = max_result_bytes
        self.op_timeout_s = op_timeout_s
        self.workers = explainer.limiter.max_running
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._target = Target.of(url, password)
        self._refused: Refusal | None = None
        """Why Redis refuses this replica, while it does (None while it is only away)."""
        self._full_log = Throttle()
        self._foreign_log = Throttle()
        # A password in the URL wins over ``password`` (redis-py reads the URL last).
        common: dict[str, Any] = {
            "password": password,
            "socket_connect_timeout": op_timeout_s,
            # Above every connection this replica may hold at once: a stream holds one of each
            # pool while it waits, and each slot's reader one blocking connection.
            "max_connections": max_streams + self.workers + _POOL_ROOM,
        }
        self._redis = Redis.from_url(url, socket_timeout=op_timeout_s, **common)
        # Blocking reads (the queue, event streams) wait longer than a plain command.
        self._blocking = Redis.from_url(url, socket_timeout=30 + op_timeout_s, **common)
        self._scripts = {name: self._redis.register_script(text) for name, text in SCRIPTS.items()}
        self._available = False
        self._down_since: float | None = None
        self._closing = False
        self._running: dict[str, _Running] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._handing_back: list[asyncio.Task[None]] = []
        self._counts: dict[JobStatus, int] = dict.fromkeys(get_args(JobStatus), 0)
        self._ran = 0
        lifecycle.on_cut(self._cut)

    # ------------------------------------------------------------------ plumbing

    def state(self) -> StoreState:
        if self._available:
            return StoreState(self.backend, True)
        refused = self._refused
        problem = (
            refused.line()
            if refused is not None
            else f"{STORE}: the Redis server at {self._target.where} does not answer; /jobs "
            "answers 503 until it does (POST /explain still works)"
        )
        return StoreState(self.backend, False, problem)

    @property
    def client(self) -> Redis:
        """The request path's connection to Redis (the explanation cache shares it:
        ``app.pipeline.jobs.redis_cache``)."""
        return self._redis

    @property
    def jobs_run(self) -> int:
        """Jobs this replica ran to their end (any outcome)."""
        return self._ran

    def _unavailable(self) -> JobStoreUnavailable:
        """The 503 while the store cannot be used: why (Redis refuses this replica, or does not
        answer) and what to do."""
        refused = self._refused
        if refused is not None:
            message = (
                f"The job store (Redis) refuses this replica: {refused.cause}; {refused.fix}. "
                "Jobs cannot be created or read until that is fixed. POST /explain still works."
            )
        else:
            message = (
                "The job store (Redis, CAMSERVE_JOB_STORE) does not answer, so jobs cannot be "
                f"created or read now; retry after {RETRY_AFTER_S} s. POST /explain still works."
            )
        return JobStoreUnavailable(message, headers={"Retry-After": str(RETRY_AFTER_S)})

    def _refusal(self, error: BaseException) -> Refusal | None:
        """The refusal ``error`` is (see ``redis_refusal``), or None."""
        return refusal(error, self._target)

    def _unusable(self, error: BaseException) -> bool:
        """Whether ``error`` says that Redis cannot be used now (away, or refusing this
        replica), rather than that a command was wrong."""
        return isinstance(error, _DOWN) or self._refusal(error) is not None

    def _lost(self, error: BaseException) -> None:
        """Mark the store unavailable because of ``error``; log it when it went down, or when
        the reason changed (Redis came back, but refuses this replica)."""
        if isinstance(error, redis_errors.MaxConnectionsError):
            return  # a full pool: this replica is busy, Redis is not down
        refused = self._refusal(error)
        if self._available or self._down_since is None:
            self._down_since = time.monotonic()
        elif refused == self._refused:
            self._available = False
            return  # said already
        if refused is not None:
            logger.error("job store unavailable: %s", refused.line())
        else:
            logger.warning("job store unavailable: %s", str(error) or type(error).__name__)
        self._refused = refused
        self._available = False

    def _pool_full(self) -> Overloaded:
        logger.warning("job store: the Redis connection pool is full (Too many connections)")
        return Overloaded(
            "This replica uses every connection to the job store it may open; retry after the "
            "seconds in Retry-After.",
            headers={"Retry-After": "1"},
        )

    def _note_full(self) -> None:
        """Say (at most every 10 s) that Redis refuses writes because it is full."""
        if self._full_log.due():
            logger.error(
                "job store: the Redis server at %s is full (used memory over its maxmemory) and "
                "refuses writes: no job can be created, started, cancelled or finished; raise its "
                "maxmemory, or lower CAMSERVE_MAX_JOBS, CAMSERVE_JOB_TTL_S or "
                "CAMSERVE_JOB_MAX_RESULT_BYTES",
                self._target.where,
            )

    def _full(self) -> JobStoreUnavailable:
        """The 503 of a write while Redis is full (``maxmemory`` with ``noeviction``): reads
        still work, so the store stays available."""
        self._note_full()
        return JobStoreUnavailable(
            "The job store (Redis) is full: it refuses to store more (its memory is over its "
            "maxmemory), so jobs cannot be created or cancelled now; retry after "
            f"{RETRY_AFTER_S} s. POST /explain still works.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    def _foreign(self, error: redis_errors.ResponseError) -> JobStoreUnavailable:
        """The 503 when a key of the store holds another type than the store wrote there:
        another program writes ``camserve:`` keys in this database."""
        if self._foreign_log.due():
            logger.error(
                "job store: a camserve: key of the Redis database at %s holds another type than "
                "the job store writes there (%s): another program uses these keys; give the "
                "service a database of its own (the /N at the end of CAMSERVE_JOB_STORE)",
                self._target.where,
                error,
            )
        return JobStoreUnavailable(
            "The job store (Redis) holds a key of the wrong type where this job's data should "
            "be: another program writes into the service's keys. Tell the operator; POST "
            "/explain still works.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    async def _call(self, make: Callable[[], object]) -> Any:
        """One request-path command (or script, or pipeline): 503 job_store_unavailable at once
        while Redis is known to be down, and after ``op_timeout_s`` at most otherwise (or when
        Redis is full and refuses a write)."""
        if not self._available:
            raise self._unavailable()
        try:
            return await asyncio.wait_for(_aw(make()), self.op_timeout_s)
        except redis_errors.MaxConnectionsError:
            raise self._pool_full() from None
        except redis_errors.OutOfMemoryError:
            raise self._full() from None
        except (*_DOWN, redis_errors.RedisError) as error:
            if isinstance(error, redis_errors.ResponseError) and _wrong_type(error):
                raise self._foreign(error) from None
            if not self._unusable(error):
                raise
            self._lost(error)
            raise self._unavailable() from None

    async def _script(
        self, name: str, keys: Sequence[str], args: Sequence[str | int | float | bytes]
    ) -> Any:
        return await _aw(self._scripts[name](keys=list(keys), args=list(args)))

    async def start(self) -> None:
        """Learn whether Redis answers (a second at most: the service starts whether it does or
        not), then start the watcher and one reader per model slot. ConfigurationError, naming
        the setting to fix, when Redis answers but refuses this replica."""
        try:
            await asyncio.wait_for(_aw(self._redis.ping()), min(1.0, self.op_timeout_s))
            await self._ensure_group()
            self._available = True
        except (*_DOWN, redis_errors.RedisError) as error:
            refused = self._refusal(error)
            if refused is not None:  # the lifespan logs it, in one line
                await self._close_clients()
                raise ConfigurationError(refused.line()) from None
            if not isinstance(error, _DOWN):
                raise
            self._lost(error)
        self._tasks.append(asyncio.create_task(self._watch(), name="jobs-redis-watch"))
        for slot in range(self.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"jobs-redis-{slot}"))

    async def close(self) -> None:
        """Hand the running jobs back to the queue, stop reading it, close the connections."""
        self._closing = True
        self._cut()
        await asyncio.gather(*self._handing_back, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._blocking.aclose()  # no read of this consumer is left waiting in Redis
        await asyncio.gather(self._forget_consumers(0, self.consumer), return_exceptions=True)
        await self._close_clients()

    async def _close_clients(self) -> None:
        """Close both connection pools."""
        await self._redis.aclose()
        await self._blocking.aclose()

    async def _ensure_group(self) -> None:
        try:
            await _aw(self._redis.xgroup_create(QUEUE, GROUP, id="0", mkstream=True))
        except redis_errors.OutOfMemoryError:
            self._note_full()  # made at a later ping, once Redis has room
        except redis_errors.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _forget_consumers(self, idle_ms: int, consumer: str = "") -> int:
        """Delete the queue's consumers (``consumer`` only, when given) that have no pending
        entry and were idle ``idle_ms``; how many."""
        deleted = await asyncio.wait_for(
            self._script("forget_consumers", [QUEUE], [GROUP, idle_ms, consumer]),
            self.op_timeout_s,
        )
        return int(deleted)

    async def _watch(self) -> None:
        """Ping Redis every 2 s (every second while it is down); keep the counts fresh."""
        while not self._closing:  # not only the cancel: wait_for may swallow it
            try:
                await asyncio.wait_for(_aw(self._redis.ping()), self.op_timeout_s)
                await self._ensure_group()
                await asyncio.wait_for(self._refresh_counts(), self.op_timeout_s)
                await self._forget_consumers(CONSUMER_IDLE_MS)
                if not self._available:
                    if self._down_since is not None:
                        logger.warning(
                            "job store available again after %.1f s",
                            time.monotonic() - self._down_since,
                        )
                    self._available = True
                    self._down_since = None
                    self._refused = None
            except redis_errors.MaxConnectionsError:
                pass  # busy, not down
            except redis_errors.OutOfMemoryError:
                self._note_full()  # full, not down: reads still work
            except (*_DOWN, redis_errors.RedisError) as error:
                if self._unusable(error):
                    self._lost(error)
                else:
                    logger.error("job store: %s", error)
            await asyncio.sleep(2.0 if self._available else 1.0)

    async def _refresh_counts(self) -> None:
        """The counts of /metrics, over every replica; active entries of expired jobs dropped."""
        active: dict[bytes, bytes] = await _aw(self._redis.hgetall(ACTIVE))
        finished: list[bytes] = await _aw(self._redis.zrange(FINISHED_SET, 0, -1))
        ids = [_text(key) for key in active]
        exists = [await _aw(self._redis.exists(_record(i))) for i in ids]
        gone = [i for i, alive in zip(ids, exists, strict=True) if not alive]
        if gone:
            await _aw(self._redis.hdel(ACTIVE, *gone))
        counts: dict[JobStatus, int] = dict.fromkeys(get_args(JobStatus), 0)
        for key, value in active.items():
            status = _text(value).split("|", 1)[0]
            if _text(key) not in gone and status in counts:
                counts[status] += 1
        for member in finished:
            status = _text(member).split(":", 1)[0]
            if status in counts:
                counts[status] += 1
        self._counts = counts

    def counts(self) -> dict[JobStatus, int]:
        return dict(self._counts)

    # ------------------------------------------------------------------ the API

    async def create(
        self,
        model: str | None,
        uploads: Sequence[Upload],
        params: ExplainParams,
        model_version: int | None = None,
        client: str = "",
        scope: str | None = None,
    ) -> JobView:
        await self.explainer.check_uploads(model, uploads, params, model_version, job=True)
        check_result_size(
            self.explainer, model, uploads, params, self.max_result_bytes, model_version
        )
        job = Job(id=new_job_id(), client=client)
        admitted, active, mine = await self._call(
            lambda: self._script(
                "admit", [ACTIVE], [job.id, client, self.max_jobs, self.max_per_client]
            )
        )
        if not admitted:
            self.check_admission(active, mine, await self._etas(client, active), RETRY_AFTER_S)
        view = job.view(with_result=False)
        inputs: dict[str, str | bytes | int] = {
            "model": model or "",
            "model_version": "" if model_version is None else model_version,
            "params": params_to_json(params),
            "scope": scope or "",
            "count": len(uploads),
        }
        for index, upload in enumerate(uploads):
            inputs[f"name:{index}"] = upload.filename
            inputs[f"data:{index}"] = upload.data
        ttl_ms = UNFINISHED_TTL_S * 1000

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    _record(job.id),
                    mapping={
                        "status": "queued",
                        "view": view.model_dump_json(),
                        "client": client,
                        "attempts": 0,
                    },
                )
                pipe.pexpire(_record(job.id), ttl_ms)
                pipe.hset(_input(job.id), mapping=inputs)  # type: ignore[arg-type]
                pipe.pexpire(_input(job.id), ttl_ms)
                pipe.xadd(
                    _events(job.id),
                    {"name": "progress", "data": _state(job)},
                    maxlen=EVENTS_KEPT,
                    approximate=True,
                )
                pipe.pexpire(_events(job.id), ttl_ms)
                pipe.xadd(QUEUE, {"id": job.id})
                await pipe.execute()

        try:
            await self._call(write)
        except JobStoreUnavailable:
            await asyncio.gather(_aw(self._redis.hdel(ACTIVE, job.id)), return_exceptions=True)
            raise
        logger.info("job %s queued (%d image(s))", job.id[:8], len(uploads))
        return view

    async def _etas(self, client: str, active: int) -> list[float | None]:
        """The ETAs of the jobs that block a new one (all, or the client's own)."""
        entries: dict[bytes, bytes] = await self._call(lambda: self._redis.hgetall(ACTIVE))
        everyone = active >= self.max_jobs
        ids = [
            _text(key)
            for key, value in entries.items()
            if everyone or _text(value).split("|", 1)[1] == client
        ]

        async def read() -> list[bytes | None]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(_record(job_id), "view")
                return cast("list[bytes | None]", await pipe.execute())

        views = await self._call(read)
        return [JobView.model_validate_json(v).progress.eta_s for v in views if v is not None]

    async def _fields(self, job_id: str, owner: str | None, *names: str) -> list[bytes | None]:
        """The job's fields ``names``; JobNotFound when it does not exist or ``owner`` (when
        given) did not make it."""
        if not _ID_RE.match(job_id):
            raise self.not_found(job_id)
        values: list[bytes | None] = await self._call(
            lambda: self._redis.hmget(_record(job_id), [*names, "client"])
        )
        if values[0] is None or not self.visible(_text(values[-1]), owner):
            raise self.not_found(job_id)
        return values[:-1]

    async def get(self, job_id: str, owner: str | None = None) -> JobView:
        view, result = await self._fields(job_id, owner, "view", "result")
        return _view(view, result)

    def parse_event_id(self, last_event_id: str) -> str | None:
        """A stream id, ``ms-seq``, each part a 64-bit number (Redis refuses a larger one)."""
        text = last_event_id.strip()
        if not _STREAM_ID_RE.match(text):
            return None
        if any(int(part) > _STREAM_ID_MAX for part in text.split("-")):
            return None
        return text

    async def cancel(self, job_id: str, owner: str | None = None) -> JobView:
        status, view_json, result = await self._fields(job_id, owner, "status", "view", "result")
        view = _view(view_json, result)
        if _text(status) in FINISHED:
            await self._call(
                lambda: self._script(
                    "forget", [_record(job_id), _events(job_id), FINISHED_SET], [job_id]
                )
            )
            return view
        job = Job.from_view(view)
        job.finish(
            "cancelled",
            self.ttl_s,
            error=ErrorDetail(code=JobCancelled.code, message="Cancelled by DELETE /jobs/{id}."),
        )
        if not await self._finish(job, "", ""):
            return await self.get(job_id, owner)  # it ended meanwhile
        return job.view()

    async def events(
        self, job_id: str, last_event_id: str | None, keep_alive_s: float
    ) -> AsyncIterator[JobEvent | None]:
        key = _events(job_id)
        after = (self.parse_event_id(last_event_id) if last_event_id else None) or "0-0"
        block_ms = int(min(keep_alive_s, 20.0) * 1000)
        try:
            final = await self._final_event(job_id)
            if final is not None:
                yield final
                return
            while True:
                read = await _aw(self._blocking.xread({key: after}, count=50, block=block_ms))
                if not read:
                    # Its end may lie behind ``after`` (a Last-Event-ID past the stream's end):
                    # the final event is sent all the same, as by the memory store.
                    final = await self._final_event(job_id)  # JobNotFound once forgotten
                    if final is not None:
                        yield final
                        return
                    yield None
                    continue
                for entry_id, fields in read[0][1]:
                    after = _text(entry_id)
                    name = _text(fields.get(b"name"))
                    if name == "progress":
                        yield JobEvent(after, name, _text(fields.get(b"data")))
                        continue
                    view = await self.get(job_id)
                    yield JobEvent(after, view.status, view.model_dump_json())
                    return
        except (redis_errors.MaxConnectionsError, Overloaded):
            # Busy, not down: the client reconnects with Last-Event-ID and goes on from here.
            logger.warning("job %s: event stream ended, no Redis connection free", job_id[:8])
        except (*_DOWN, JobStoreUnavailable) as error:
            # The client reconnects with Last-Event-ID and goes on from here.
            if not isinstance(error, JobStoreUnavailable):
                self._lost(error)
            logger.info("job %s: event stream ended, the job store is unavailable", job_id[:8])
        except JobNotFound:
            return  # forgotten (DELETE) or expired while followed
        except redis_errors.ResponseError as error:
            if not _wrong_type(error):
                raise
            self._foreign(error)  # logged; the stream ends

    async def _final_event(self, job_id: str) -> JobEvent | None:
        """The job's final event (the whole job, with the id of its stream's newest entry), or
        None while it has not ended; JobNotFound once it is gone."""
        status, view_json, result = await self._fields(job_id, None, "status", "view", "result")
        if _text(status) not in FINISHED:
            return None
        key = _events(job_id)
        newest = await self._call(lambda: self._redis.xrevrange(key, count=1))
        newest_id = _text(newest[0][0]) if newest else "0-0"
        return JobEvent(newest_id, _text(status), _view(view_json, result).model_dump_json())

    # ------------------------------------------------------------------ workers

    async def _finish(self, job: Job, owner: str, result: str) -> bool:
        """Write ``job``'s final state (``owner``: only if this consumer still owns it)."""
        view = job.view(with_result=False).model_dump_json()
        finished: int = await self._call(
            lambda: self._script(
                "finish",
                [_record(job.id), ACTIVE, FINISHED_SET, _events(job.id), _input(job.id)],
                [
                    job.id,
                    job.status,
                    view,
                    result,
                    time.time(),
                    int(self.ttl_s * 1000),
                    self.max_jobs,
                    owner,
                    PREFIX,
                    EVENTS_KEPT,
                ],
            )
        )
        return bool(finished)

    async def _work(self) -> None:
        """One slot's reader: take a job when the slot is free (and the models are loaded),
        run it, repeat; stop taking jobs once the service drains."""
        while not self._closing and not self.lifecycle.draining:
            if not self._available or not self.explainer.registry.ready:
                await asyncio.sleep(0.2)  # no job taken before the models are loaded
                continue
            try:
                entry = await self._next_entry()
            except redis_errors.MaxConnectionsError:
                await asyncio.sleep(0.5)  # busy, not down
                continue
            except _DOWN as error:
                self._lost(error)
                continue
            except redis_errors.ResponseError as error:
                if "NOGROUP" in str(error):  # Redis restarted empty
                    await asyncio.gather(self._ensure_group(), return_exceptions=True)
                else:
                    logger.error("job store: reading the queue failed: %s", error)
                    await asyncio.sleep(1.0)
                continue
            if entry is None:
                continue
            entry_id, job_id = entry
            if self.lifecycle.draining:
                await self._requeue(entry_id, job_id)
                return
            with self.lifecycle.track():
                try:
                    await self._run_entry(entry_id, job_id)
                except (*_DOWN, JobStoreUnavailable) as error:
                    if not isinstance(error, JobStoreUnavailable):
                        self._lost(error)
                    # Its entry stays pending: it runs again once Redis is back and the lease
                    # is over.
                    logger.warning("job %s: the job store went away while it ran", job_id[:8])
                except redis_errors.OutOfMemoryError:
                    # Its entry stays pending: it runs again once Redis has room.
                    self._note_full()
                    await asyncio.sleep(1.0)
                except Exception:
                    # A bug must not cost the slot its reader; the lease brings the job back.
                    logger.exception("job %s: its run failed in the job store", job_id[:8])
                    await asyncio.sleep(1.0)

    async def _next_entry(self) -> tuple[str, str] | None:
        """An entry whose worker died (idle past the lease), else a new one (None after a
        second without)."""
        lease_ms = int(self.lease_s * 1000)
        claimed = await _aw(
            self._blocking.xautoclaim(QUEUE, GROUP, self.consumer, lease_ms, count=1)
        )
        entries = [(i, f) for i, f in claimed[1] if f]
        if entries:
            logger.info("taking over job entry %s, idle past the lease", _text(entries[0][0]))
        else:
            read = await _aw(
                self._blocking.xreadgroup(
                    GROUP, self.consumer, {QUEUE: ">"}, count=1, block=_READ_BLOCK_MS
                )
            )
            entries = read[0][1] if read else []
        if not entries:
            return None
        entry_id, fields = entries[0]
        return _text(entry_id), _text(fields.get(b"id"))

    async def _ack(self, entry_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(QUEUE, GROUP, entry_id)
            pipe.xdel(QUEUE, entry_id)
            await pipe.execute()

    async def _requeue(self, entry_id: str, job_id: str) -> None:
        """Give back an entry taken but not started (the service began to drain)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(QUEUE, GROUP, entry_id)
            pipe.xdel(QUEUE, entry_id)
            pipe.xadd(QUEUE, {"id": job_id})
            await pipe.execute()

    async def _run_entry(self, entry_id: str, job_id: str) -> None:
        ttl_ms = UNFINISHED_TTL_S * 1000
        kind, attempts = await self._script(
            "claim", [_record(job_id), ACTIVE], [job_id, self.consumer, ttl_ms]
        )
        if _text(kind) != "claimed":
            await self._ack(entry_id)  # expired, cancelled while queued, or done
            return
        fields: dict[bytes, bytes] = await _aw(self._redis.hgetall(_input(job_id)))
        view_json, client = await _aw(self._redis.hmget(_record(job_id), ["view", "client"]))
        job = Job.from_view(JobView.model_validate_json(view_json), _text(client))
        job.status, job.started, job.done, job.total = "queued", None, 0, 0  # from the start
        if attempts > self.max_attempts or not fields:
            message = (
                f"The job was started {attempts - 1} times (CAMSERVE_JOB_MAX_ATTEMPTS="
                f"{self.max_attempts}) and each time the replica running it stopped before it "
                "ended (killed, or out of memory); it is not tried again. Submit it with less "
                "work (fewer images, a cheaper method), or run it with POST /explain."
                if fields
                else "The job's input was lost from the job store before it could run; "
                "submit it again."
            )
            code = "job_attempts_exhausted" if fields else "job_input_lost"
            job.finish("failed", self.ttl_s, error=ErrorDetail(code=code, message=message))
            await self._finish(job, self.consumer, "")
            await self._ack(entry_id)
            logger.warning("job %s failed: %s", job_id[:8], code)
            return
        model = _text(fields[b"model"]) or None
        version_text = _text(fields.get(b"model_version"))
        model_version = int(version_text) if version_text else None
        params = params_from_json(fields[b"params"])
        scope = _text(fields.get(b"scope")) or None
        uploads = [
            Upload(_text(fields[f"name:{i}".encode()]), fields[f"data:{i}".encode()])
            for i in range(int(fields[b"count"]))
        ]
        loop = asyncio.get_running_loop()

        def report(done: int, total: int) -> None:  # called in the pass thread
            loop.call_soon_threadsafe(job.on_progress, done, total)

        task = asyncio.create_task(
            run_job(
                self.explainer,
                model,
                uploads,
                params,
                report,
                job_id,
                model_version,
                scope,
                client=job.client,
            )
        )
        run = _Running(job, entry_id, task)
        self._running[job_id] = run
        logger.info("job %s running here (attempt %d)", job_id[:8], attempts)
        follower = asyncio.create_task(self._follow(run))
        try:
            await asyncio.wait({task})
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            del self._running[job_id]
            del uploads[:]
        if task.cancelled():
            logger.info("job %s stopped here: %s", job_id[:8], run.stopped or "cancelled")
            if run.stopped == "cancelled":
                await self._ack(entry_id)
            return
        outcome = task.result()
        result = "" if outcome.result is None else outcome.result.model_dump_json()
        error = outcome.error
        if len(result) > self.max_result_bytes:
            result = ""
            error = ErrorDetail(
                code="result_too_large",
                message=f"The result came to more than the {self.max_result_bytes / 1e6:.1f} MB "
                "a job may keep (CAMSERVE_JOB_MAX_RESULT_BYTES); ask for fewer images, outputs "
                "or a smaller size.",
            )
        job.finish("succeeded" if result or error is None else "failed", self.ttl_s, error=error)
        if not await self._finish(job, self.consumer, result):
            logger.info("job %s: ended here, but was cancelled or taken over meanwhile", job_id)
            return
        await self._ack(entry_id)
        self._ran += 1
        logger.info("job %s %s", job_id[:8], job.status)

    async def _follow(self, run: _Running) -> None:
        """Write the job's progress after every change (at least every second), renew its lease,
        and stop it when it was cancelled or taken over elsewhere."""
        job = run.job
        beat_every = self.lease_s / 3
        last_beat = time.monotonic()
        written = -1
        ttl_ms = UNFINISHED_TTL_S * 1000
        # Python 3.11's wait_for (in Job.changed) may swallow a cancel that arrives as the wait
        # ends: the end of the run is checked too, or this loop would outlive the job.
        refused = False
        while not run.task.done():
            await job.changed(min(1.0, beat_every))
            if run.task.done():
                return
            revision, view, data = job.revision, "", ""
            if revision != written:
                view, data = job.view(with_result=False).model_dump_json(), _state(job)
            try:
                state = _text(
                    await self._script(
                        "progress",
                        [_record(job.id), _events(job.id), _input(job.id)],
                        [self.consumer, view, data, ttl_ms, EVENTS_KEPT],
                    )
                )
                written = revision
                if time.monotonic() - last_beat >= beat_every:
                    await _aw(
                        self._redis.xclaim(QUEUE, GROUP, self.consumer, 0, [run.entry], justid=True)
                    )
                    last_beat = time.monotonic()
            except _DOWN as error:
                self._lost(error)
                continue  # the pass goes on; its lease runs out only if Redis stays away
            except redis_errors.RedisError as error:
                # Redis refused this write (full past maxmemory, read-only after a failover):
                # try again at the next turn. A follower that died here would leave the run
                # with no lease (another replica would run the job too) and no cancel.
                if not refused:
                    logger.warning("job %s: Redis refused its progress: %s", job.id[:8], error)
                refused = True
                continue
            refused = False
            if state != "running":
                run.stopped = "cancelled" if state == "cancelled" else "lost"
                run.task.cancel()
                return

    def _cut(self) -> None:
        """The grace period is over (or the store closes): hand every running job back."""
        for run in list(self._running.values()):
            if not run.stopped:
                run.stopped = "handed back"
                run.task.cancel()
                self._handing_back.append(asyncio.create_task(self._hand_back(run)))

    async def _hand_back(self, run: _Running) -> None:
        job = Job(id=run.job.id, created=run.job.created, client=run.job.client)
        try:
            handed = await self._script(
                "hand_back",
                [_record(job.id), ACTIVE, QUEUE, _events(job.id)],
                [
                    job.id,
                    self.consumer,
                    GROUP,
                    run.entry,
                    job.view(with_result=False).model_dump_json(),
                    _state(job),
                    UNFINISHED_TTL_S * 1000,
                    EVENTS_KEPT,
                ],
            )
        except _DOWN as error:
            # Its entry stays pending: another replica takes it once the lease runs out.
            logger.warning("job %s not handed back (%s); its lease will run out", job.id, error)
            return
        if handed:
            logger.info("job %s handed back to the queue", job.id[:8])


def _wrong_type(error: redis_errors.ResponseError) -> bool:
    """Whether Redis refused a command because its key holds another type."""
    return str(error).startswith("WRONGTYPE")


def _view(view: bytes | None, result: bytes | None) -> JobView:
    parsed = JobView.model_validate_json(view or b"")
    if result:
        parsed.result = ExplainResponse.model_validate_json(result)
    return parsed
