"""The explanation cache: an answer computed once is answered again without the model.

A stage of the explain path, before admission and decoding: once the parameters have been
checked against the model, the request's key is looked up; a hit is the stored answer (with the
request's own file names and timings), a miss runs the other stages and keeps their answer.

The key (``explanation_key``) is a BLAKE2b hash of everything the answer depends on:

- each upload's bytes (their own BLAKE2b digests, in order; the file names are not in it: a hit
  answers with the request's names);
- the model: name, version, device, and its build (a digest of the files of its version folder
  and of its manifest), so that a model swapped in under the same version never meets the old
  model's entries;
- every field of ``ExplainParams``, read generically (``dataclasses.asdict``): a parameter added
  there is in the key without a change here; and what the check made of them (each method's
  layers and options with the model's defaults, the pictures' kind, size and format);
- the camserve version and the layout of the key (``KEY_LAYOUT``).

A random method (one that declares a ``seed`` option: SSCAM, SmoothGradCAMpp, ...) is cached
only with a seed; without one, two calls differ and the request bypasses the cache.

Entries are kept in this process's memory, bounded in bytes and dropped least recently used
first (``MemoryTier``). With a Redis job store a second tier (``SharedTier``, in
``app.pipeline.jobs.redis_cache``) keeps them in Redis as well, for every replica, under the
same bound, for ``CAMSERVE_CACHE_TTL_S``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from app import __version__
from app.cam.core import _CAM
from app.cam.options import SEED
from app.models.loading import LoadedModel
from app.models.registry import ModelRegistry
from app.pipeline.admission import run_to_the_end
from app.pipeline.answers import answer_parts
from app.pipeline.decoding import Upload
from app.pipeline.passes import CamPlan
from app.pipeline.rendering import RenderStyle
from app.pipeline.results import ExplainResponse, ExplainTimings
from app.settings import Settings

logger = logging.getLogger(__name__)

CACHE_HEADER = "X-Camserve-Cache"
CacheState = Literal["hit", "miss", "bypass", "off"]
"""``hit``: answered from the cache; ``miss``: computed, then kept; ``bypass``: computed and not
kept (a random method without a seed); ``off``: the service has no cache."""
CacheEvent = Literal["hit", "miss", "bypass", "eviction", "expiry", "too_large"]

KEY_LAYOUT = 1
"""Raise it when what the key covers, or how an entry is written, changes: old entries (in
Redis) are then never read."""
ENTRY_SHARE = 4
ENTRY_OVERHEAD = 320
"""Bytes an entry of the memory tier takes beyond its key's and value's data: the index's
node and table, the (value, expiry) tuple, the objects' headers (up to 290 measured on
CPython 3.11, with the churn of evictions). Counted in the bound: the smallest answers (1.7 kB)
took the tier 13% past CAMSERVE_CACHE_MB without it."""
"""An answer over 1/ENTRY_SHARE of the cache is not kept: it would push out most others."""
_INLINE_HASH_BYTES = 256 * 1024
"""Uploads up to this many bytes in all are hashed on the event loop (well under a
millisecond); more go to the image threads."""


def is_random(cls: type[_CAM]) -> bool:
    """Whether a method's maps are random: it declares a ``seed`` option for its noise."""
    return cls.option(SEED.name) is not None


def cacheable(plans: Sequence[CamPlan]) -> bool:
    """Whether the answer of these plans is the same every time: no random method runs
    without a seed."""
    return all(
        not is_random(plan.cls) or dict(plan.options).get(SEED.name) is not None for plan in plans
    )


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


_builds: weakref.WeakKeyDictionary[LoadedModel, str] = weakref.WeakKeyDictionary()
_builds_lock = threading.Lock()


def model_build(registry: ModelRegistry, model: LoadedModel) -> str:
    """What tells this load of a model from any other under its name and version: the digest
    of its version folder's files (relative paths, sizes, modification times: the registry's own
    test of a change, ``app.models.store.fingerprint``; and their bytes, read when it loaded)
    and of its manifest. Replicas share entries when their model files agree (a shared volume,
    the same image); a model the registry does not list with a fingerprint (one built by hand)
    gets a random token of its own, which no other load ever shares."""
    with _builds_lock:
        known = _builds.get(model)
        if known is not None:
            return known
        entry = registry.entries.get(model.spec.name)
        version = entry.versions.get(model.spec.version) if entry is not None else None
        if version is not None and version.model is model and version.fingerprint:
            # The folder's place differs between machines; its files and manifest are the model.
            spec = dataclasses.replace(model.spec, folder=Path(model.spec.folder.name))
            build = _digest(repr((version.fingerprint, version.content, spec)).encode())
        else:
            build = "token-" + secrets.token_hex(16)
        _builds[model] = build
        return build


def _plain(value: Any) -> Any:
    """A dataclass as plain data for the key; anything JSON cannot write by its ``repr``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def explanation_key(
    model: tuple[str, int, str, str],
    image_digests: Sequence[str],
    params: Any,
    plans: Sequence[CamPlan],
    style: RenderStyle,
    scope: str | None = None,
) -> str:
    """The cache key of an explanation: ``model`` is (name, version, device, build), ``params``
    the request's ``ExplainParams`` (every field counts), ``scope`` whose entries these are
    (None: everyone's)."""
    payload = {
        "scope": scope,
        "layout": KEY_LAYOUT,
        "camserve": __version__,
        "model": list(model),
        "images": list(image_digests),
        "params": _plain(params),
        "plans": [
            [plan.method, list(plan.layers), [list(o) for o in plan.options], plan.normalized]
            for plan in plans
        ],
        "style": _plain(style),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=repr)
    return _digest(text.encode())


def _size(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


class MemoryTier:
    """Entries in this process, at most ``capacity`` bytes (keys, values and
    ``ENTRY_OVERHEAD`` each), the least recently used dropped first; each lives ``ttl_s`` at
    most (None: until dropped)."""

    def __init__(
        self,
        capacity: int,
        ttl_s: float | None = None,
        on_event: Callable[[CacheEvent], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.on_event = on_event
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes held now (keys, values and their overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _tell(self, event: CacheEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= _size(key, value)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            value, expires = found
            if time.monotonic() >= expires:
                self._drop(key)
                expired = True
            else:
                self._entries.move_to_end(key)
                return value
        if expired:
            self._tell("expiry")
        return None

    def put(self, key: str, value: bytes) -> bool:
        """Keep ``value`` (dropping the least recently used entries to make room); False when
        it is over 1/ENTRY_SHARE of the capacity and was not kept."""
        size = _size(key, value)
        if size > self.capacity // ENTRY_SHARE:
            self._tell("too_large")
            return False
        expires = time.monotonic() + self.ttl_s if self.ttl_s else float("inf")
        evicted = 0
        with self._lock:
            if key in self._entries:
                self._drop(key)
            while self._entries and self._bytes + size > self.capacity:
                self._drop(next(iter(self._entries)))
                evicted += 1
            self._entries[key] = (value, expires)
            self._bytes += size
        for _ in range(evicted):
            self._tell("eviction")
        return True


class SharedTier(Protocol):
    """A cache that replicas share (Redis): never raises, a failure is a miss."""

    name: str

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> int:
        """Keep ``value``; the number of entries dropped to make room."""


@dataclass(frozen=True)
class Lookup:
    """What the cache stage found for one request."""

    state: CacheState
    key: str = ""
    answer: ExplainResponse | None = None
    """The answer on a hit."""


class ExplanationCache:
    """The cache stage: ``look_up`` before the model stages, ``keep`` after them."""

    def __init__(
        self,
        memory: MemoryTier,
        *,
        shared: SharedTier | None = None,
        threads: Executor | None = None,
        on_event: Callable[[CacheEvent, str], None] | None = None,
    ) -> None:
        self.memory = memory
        self.shared = shared
        """A second tier that replicas share (set once the job store is open)."""
        self.threads = threads
        """Where large uploads are hashed and answers written (None: the loop's pool)."""
        self.on_event = on_event
        """Told (event, tier) for every hit, miss, bypass and eviction (the metrics)."""
        memory.on_event = lambda event: self._tell(event, "memory")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        threads: Executor | None = None,
        on_event: Callable[[CacheEvent, str], None] | None = None,
    ) -> ExplanationCache | None:
        """The cache ``CAMSERVE_CACHE_MB`` asks for (None: 0, no cache)."""
        if settings.cache_mb == 0:
            return None
        memory = MemoryTier(settings.cache_mb * 1024 * 1024, settings.cache_ttl_s or None)
        return cls(memory, threads=threads, on_event=on_event)

    def _tell(self, event: CacheEvent, tier: str) -> None:
        if self.on_event is not None:
            self.on_event(event, tier)

    @property
    def max_entry_bytes(self) -> int:
        return self.memory.capacity // ENTRY_SHARE

    async def look_up(
        self,
        model: tuple[str, int, str, str],
        uploads: Sequence[Upload],
        params: Any,
        plans: Sequence[CamPlan],
        style: RenderStyle,
        started: float,
        scope: str | None = None,
    ) -> Lookup:
        """The request's key, and its answer when kept (``started``: when the request began,
        for the hit's ``total_ms``; ``scope``: whose entries it may see, None for everyone's)."""
        if not cacheable(plans):
            self._tell("bypass", "")
            return Lookup("bypass")
        digests = await self._digests(uploads)
        key = explanation_key(model, digests, params, plans, style, scope)
        tier = "memory"
        kept = self.memory.get(key)
        if kept is None and self.shared is not None:
            kept = await self.shared.get(key)
            tier = self.shared.name
            if kept is not None:
                self.memory.put(key, kept)
        if kept is None:
            self._tell("miss", "")
            return Lookup("miss", key)
        answer = _answer_from(kept, uploads, plans, started)
        if answer is None:
            self._tell("miss", "")
            return Lookup("miss", key)
        self._tell("hit", tier)
        return Lookup("hit", key, answer)

    async def keep(self, lookup: Lookup, answer: ExplainResponse) -> ExplainResponse:
        """Mark the computed ``answer`` with the lookup's state and keep it on a miss."""
        answer.timings.cache = lookup.state
        if lookup.state != "miss":
            return answer
        # Sliced like the HTTP answer: one serializer call over a big answer would hold the GIL
        # (and every request on the event loop) for tens of milliseconds.
        parts = await answer_parts(answer)
        if sum(map(len, parts)) > self.max_entry_bytes:
            return answer
        value = b"".join(parts)
        if self.memory.put(lookup.key, value) and self.shared is not None:
            for _ in range(await self.shared.put(lookup.key, value)):
                self._tell("eviction", self.shared.name)
        return answer

    async def _digests(self, uploads: Sequence[Upload]) -> list[str]:
        def work() -> list[str]:
            return [_digest(upload.data) for upload in uploads]

        if sum(len(upload.data) for upload in uploads) <= _INLINE_HASH_BYTES:
            return work()
        return await run_to_the_end(self.threads, work)


def _answer_from(
    kept: bytes, uploads: Sequence[Upload], plans: Sequence[CamPlan], started: float
) -> ExplainResponse | None:
    """The kept answer with this request's file names and the hit's timings (None: unreadable,
    e.g. written by another camserve; then it is a miss)."""
    try:
        answer = ExplainResponse.model_validate_json(kept)
    except ValueError:
        logger.warning("explanation cache: an entry could not be read; computing it again")
        return None
    if len(answer.results) != len(uploads):
        return None
    for result, upload in zip(answer.results, uploads, strict=True):
        result.filename = upload.filename
    answer.timings = ExplainTimings(
        decode_ms=0.0,
        queue_ms=0.0,
        forward_ms=0.0,
        cam_ms=0.0,
        encode_ms=0.0,
        total_ms=round((time.perf_counter() - started) * 1000, 3),
        batch_images=0,
        cam_ms_by_method={plan.method: 0.0 for plan in plans},
        cache="hit",
    )
    return answer
