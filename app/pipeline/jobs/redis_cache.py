"""The explanation cache's shared tier: answers kept in the Redis of the job store, for every
replica, at most ``CAMSERVE_CACHE_MB`` in all, each for ``CAMSERVE_CACHE_TTL_S``.

It uses the job store's own connection (``CAMSERVE_JOB_STORE``, ``CAMSERVE_JOB_STORE_PASSWORD``),
never a second configuration. Each answer is a string key ``camserve:cache:<layout>:<key>`` with
its TTL; an index (a sorted set by last use, a hash of sizes and a byte count) bounds the tier:
a write first drops the expired entries, then the least recently used ones until the answer fits,
in one Lua script, so that replicas never see half of it. A hit renews the entry's TTL and its
place in the index. The bound keeps the cache from filling the Redis that the jobs need.

A failure is a miss, never an error: while the store knows Redis to be down the tier is skipped
at once, and a command that fails or takes longer than the store's ``op_timeout_s`` counts as
not found (a request then computes its answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors

from app.pipeline.cache import KEY_LAYOUT
from app.pipeline.jobs.redis_store import RedisJobStore, _aw

logger = logging.getLogger(__name__)

PREFIX = f"camserve:cache:{KEY_LAYOUT}:"
INDEX = PREFIX + "index"
SIZES = PREFIX + "sizes"
TOTAL = PREFIX + "bytes"
_FAILED = (redis_errors.RedisError, OSError, asyncio.TimeoutError)

# KEYS: index, sizes, total. ARGV: prefix, key, now (ms), ttl (ms).
_GET = """
local value = redis.call('GET', ARGV[1] .. ARGV[2])
if value then
  redis.call('PEXPIRE', ARGV[1] .. ARGV[2], ARGV[4])
  redis.call('ZADD', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[2])
end
return value
"""

# KEYS: index, sizes, total. ARGV: prefix, key, now (ms), ttl (ms), value, capacity (bytes).
# Returns the number of entries dropped to make room.
_PUT = """
local function drop(key)
  local size = tonumber(redis.call('HGET', KEYS[2], key) or '0')
  redis.call('DEL', ARGV[1] .. key)
  redis.call('HDEL', KEYS[2], key)
  redis.call('ZREM', KEYS[1], key)
  redis.call('DECRBY', KEYS[3], size)
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])) do
  drop(key)
end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  drop(ARGV[2])
end
local size = string.len(ARGV[2]) + string.len(ARGV[5])
local capacity = tonumber(ARGV[6])
local dropped = 0
while tonumber(redis.call('GET', KEYS[3]) or '0') + size > capacity do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then
    redis.call('SET', KEYS[3], 0)
    break
  end
  drop(oldest[1])
  dropped = dropped + 1
end
redis.call('SET', ARGV[1] .. ARGV[2], ARGV[5], 'PX', ARGV[4])
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], size)
redis.call('INCRBY', KEYS[3], size)
return dropped
"""


class RedisTier:
    """Cached answers in the job store's Redis, shared by the replicas."""

    name = "redis"

    def __init__(self, store: RedisJobStore, capacity: int, ttl_s: float) -> None:
        self.store = store
        self.capacity = capacity
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._get = store.client.register_script(_GET)
        self._put = store.client.register_script(_PUT)
        self._failing = False

    async def _command(self, make: Callable[[], object]) -> Any:
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

    def _args(self, key: str) -> list[str | int]:
        return [PREFIX, key, int(time.time() * 1000), self.ttl_ms]

    async def get(self, key: str) -> bytes | None:
        value = await self._command(
            lambda: self._get(keys=[INDEX, SIZES, TOTAL], args=self._args(key))
        )
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> int:
        """Keep ``value``; the number of entries dropped to make room."""
        args = [*self._args(key), value, self.capacity]
        dropped = await self._command(lambda: self._put(keys=[INDEX, SIZES, TOTAL], args=args))
        return int(dropped or 0)
