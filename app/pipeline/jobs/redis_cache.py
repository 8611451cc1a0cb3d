"""The explanation cache's shared tier: answers kept in the Redis of the job store, for every
replica, each for ``CAMSERVE_CACHE_TTL_S``.

It uses the job store's own connection (``CAMSERVE_JOB_STORE``, ``CAMSERVE_JOB_STORE_PASSWORD``),
never a second configuration. A failure is a miss, never an error: while the store knows Redis
to be down the tier is skipped at once, and a command that fails or takes longer than the store's
``op_timeout_s`` counts as not found (a request then computes its answer). Redis holds what the
replicas computed in the last TTL, entries over a quarter of ``CAMSERVE_CACHE_MB`` excepted;
size Redis (``maxmemory``) for it, with ``noeviction`` since it also holds the jobs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis import exceptions as redis_errors

from app.pipeline.cache import KEY_LAYOUT
from app.pipeline.jobs.redis_store import RedisJobStore, _aw

logger = logging.getLogger(__name__)

PREFIX = f"camserve:cache:{KEY_LAYOUT}:"
_FAILED = (redis_errors.RedisError, OSError, asyncio.TimeoutError)


class RedisTier:
    """Cached answers in the job store's Redis, each under ``camserve:cache:<layout>:<key>``."""

    name = "redis"

    def __init__(self, store: RedisJobStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._failing = False

    async def _command(self, make: Any) -> Any:
        if not self.store.state().available:
            return None
        try:
            result = await asyncio.wait_for(_aw(make()), self.store.op_timeout_s)
        except _FAILED as error:
            if not self._failing:
                logger.warning(
                    "explanation cache: Redis failed (%s); answers are computed meanwhile",
                    str(error) or type(error).__name__,
                )
            self._failing = True
            return None
        self._failing = False
        return result

    async def get(self, key: str) -> bytes | None:
        value = await self._command(lambda: self.store.client.get(PREFIX + key))
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> None:
        await self._command(lambda: self.store.client.set(PREFIX + key, value, px=self.ttl_ms))
