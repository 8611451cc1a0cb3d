"""Explanations run as jobs: created at once, followed by id, cancelled on request, kept a while.

One interface (``base.JobStore``), two backends chosen by ``CAMSERVE_JOB_STORE``: ``memory``
(this process, the default) and ``redis://`` (shared by every replica).
"""

from __future__ import annotations

from app.lifecycle import Lifecycle
from app.pipeline.cache import ExplanationCache
from app.pipeline.explainer import Explainer
from app.pipeline.jobs.base import JobEvent, JobStore, StoreState
from app.pipeline.jobs.memory import MemoryJobStore
from app.settings import Settings

__all__ = ["JobEvent", "JobStore", "StoreState", "open_job_store", "share_cache"]


def open_job_store(settings: Settings, explainer: Explainer, lifecycle: Lifecycle) -> JobStore:
    """The store ``CAMSERVE_JOB_STORE`` names (not started yet: ``await store.start()``)."""
    if settings.job_store == "memory":
        return MemoryJobStore(
            explainer,
            settings.max_jobs,
            settings.job_ttl_s,
            lifecycle,
            max_per_client=settings.max_jobs_per_client,
            max_upload_bytes=settings.job_upload_budget_bytes,
            max_result_bytes=settings.job_max_result_bytes,
        )
    from app.pipeline.jobs.redis_store import RedisJobStore  # redis-py only when asked for

    password = settings.job_store_password
    return RedisJobStore(
        settings.job_store,
        explainer,
        lifecycle,
        max_jobs=settings.max_jobs,
        ttl_s=settings.job_ttl_s,
        max_per_client=settings.max_jobs_per_client,
        password=password.get_secret_value() if password else None,
        lease_s=settings.job_lease_s,
        max_attempts=settings.job_max_attempts,
        max_result_bytes=settings.job_max_result_bytes,
        max_streams=settings.max_event_streams,
    )


def share_cache(cache: ExplanationCache | None, store: JobStore, settings: Settings) -> None:
    """Give the explanation cache a tier in the job store's Redis, shared by the replicas and
    bounded like this process's (``CAMSERVE_CACHE_MB``), when the store is Redis and
    ``CAMSERVE_CACHE_TTL_S`` is not 0 (entries there expire)."""
    if cache is None or store.backend != "redis" or not settings.cache_ttl_s:
        return
    from app.pipeline.jobs.redis_cache import RedisTier  # redis-py only when asked for
    from app.pipeline.jobs.redis_store import RedisJobStore

    if isinstance(store, RedisJobStore):
        cache.shared = RedisTier(store, cache.memory.capacity, settings.cache_ttl_s)
