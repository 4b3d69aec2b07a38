"""Pick the Store implementation: memory by default, Redis when given a URL."""

from __future__ import annotations

from signalling.store import AUDIT_CAP, MemoryStore, Store
from signalling.store_redis import DEFAULT_PREFIX, RedisStore


async def open_store(
    redis_url: str | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    audit_cap: int = AUDIT_CAP,
) -> Store:
    """A MemoryStore when ``redis_url`` is None or empty, else a connected RedisStore.

    Raises StoreError when the Redis server cannot be reached. The caller closes
    the store (in the app's ``cleanup_ctx``).
    """
    if not redis_url:
        return MemoryStore(audit_cap=audit_cap)
    return await RedisStore.connect(redis_url, prefix=prefix, audit_cap=audit_cap)
