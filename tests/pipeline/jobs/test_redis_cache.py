"""The explanation cache's Redis tier, against a real redis-server: replicas share answers, each
entry expires, and Redis going away turns hits into misses, never into errors."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.pipeline.jobs.redis_cache import INDEX, PREFIX, SIZES, TOTAL, RedisTier
from tests.conftest import files, image_bytes
from tests.http.routes.test_jobs import finished, submit, wait_for
from tests.observability.test_metrics import scrape, value
from tests.redis_server import RedisServer

FORM = {"method": "GradCAM", "output": "overlay,raw"}
# Each test empties the database it takes first (test_redis_store.py takes them in turn too).
_databases = itertools.cycle(range(48, 64))


@pytest.fixture
def replicas(
    make_client: Callable[..., TestClient], redis_server: RedisServer
) -> tuple[Callable[..., TestClient], int]:
    """Start replicas with a cache, sharing one emptied Redis database (and that database)."""
    db = next(_databases)
    redis_server.client(db).flushdb()

    def start(**changes: object) -> TestClient:
        return make_client(**{"job_store": redis_server.url(db), "cache_mb": 8, **changes})

    return start, db


def explain(client: TestClient, seed: int = 5):  # type: ignore[no-untyped-def]
    response = client.post("/explain", files=files(image_bytes(seed=seed)), data=FORM)
    assert response.status_code == 200, response.text
    return response


def test_a_replica_answers_from_what_another_computed(
    replicas: tuple[Callable[..., TestClient], int], redis_server: RedisServer
) -> None:
    start, db = replicas
    a, b = start(cache_ttl_s=120), start(cache_ttl_s=120)
    assert isinstance(b.app.state.explainer.cache.shared, RedisTier)  # type: ignore[attr-defined]
    computed = explain(a)
    shared = explain(b)
    assert computed.headers["x-camserve-cache"] == "miss"
    assert shared.headers["x-camserve-cache"] == "hit"
    assert shared.json()["results"] == computed.json()["results"]
    assert value(scrape(b), "camserve_cache_hits_total", tier="redis") == 1
    # B keeps it in its own memory too: the next hit does not ask Redis.
    assert explain(b).headers["x-camserve-cache"] == "hit"
    assert value(scrape(b), "camserve_cache_hits_total", tier="memory") == 1

    redis = redis_server.client(db)
    (key,) = redis.zrange(INDEX, 0, -1)
    assert 0 < redis.pttl(PREFIX + key.decode()) <= 120_000
    # A job asks the cache too: its result is the hit's.
    job = submit(b, image_bytes(seed=5), **FORM)
    view = wait_for(b, job["id"], finished)
    assert view["status"] == "succeeded"
    assert view["result"]["timings"]["cache"] == "hit"
    assert view["result"]["results"] == computed.json()["results"]


def test_the_shared_tier_stays_under_its_bound(
    replicas: tuple[Callable[..., TestClient], int], redis_server: RedisServer
) -> None:
    start, db = replicas
    a = start(cache_mb=1)
    redis = redis_server.client(db)
    explain(a, seed=100)
    size = int(redis.get(TOTAL) or 0)
    (first,) = redis.zrange(INDEX, 0, -1)
    assert size > 0 and redis.get(PREFIX + first.decode()) is not None
    for seed in range(101, 103 + int(1024 * 1024 / size)):
        explain(a, seed=seed)
    total, sizes = int(redis.get(TOTAL) or 0), redis.hgetall(SIZES)
    assert total <= 1024 * 1024 and total == sum(int(v) for v in sizes.values())
    answers = {k for k in redis.keys(PREFIX + "*") if k.decode() not in (INDEX, SIZES, TOTAL)}
    assert len(answers) == len(sizes) == redis.zcard(INDEX) < 103 + int(1024 * 1024 / size) - 100
    dropped = value(scrape(a), "camserve_cache_evictions_total", tier="redis", reason="lru")
    assert dropped is not None and dropped >= 1
    # The oldest answer left Redis, index and all.
    assert redis.get(PREFIX + first.decode()) is None and redis.zscore(INDEX, first) is None


def test_ttl_0_keeps_the_cache_in_each_replica_only(
    replicas: tuple[Callable[..., TestClient], int], redis_server: RedisServer
) -> None:
    start, db = replicas
    a, b = start(cache_ttl_s=0), start(cache_ttl_s=0)
    assert b.app.state.explainer.cache.shared is None  # type: ignore[attr-defined]
    assert explain(a).headers["x-camserve-cache"] == "miss"
    assert explain(b).headers["x-camserve-cache"] == "miss"
    assert explain(b).headers["x-camserve-cache"] == "hit"
    assert redis_server.client(db).keys("camserve:cache:*") == []


def test_without_redis_answers_are_computed(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    a = make_client(job_store=server.url(), cache_mb=8)
    assert explain(a, seed=7).headers["x-camserve-cache"] == "miss"
    server.stop()
    # Redis gone: not found there, computed, and kept in this replica's memory all the same.
    assert explain(a, seed=8).headers["x-camserve-cache"] == "miss"
    assert explain(a, seed=8).headers["x-camserve-cache"] == "hit"
    assert explain(a, seed=7).headers["x-camserve-cache"] == "hit"
