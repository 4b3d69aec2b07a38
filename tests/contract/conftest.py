"""Fixtures for the contract tests: every test runs against each Store implementation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aredis

from signalling.store import AUDIT_CAP, MemoryStore, Store
from signalling.store_redis import RedisStore
from tests.services import RedisServer

StoreMaker = Callable[..., Awaitable[Store]]

STORE_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def _drop_prefix(url: str, prefix: str) -> None:
    client = aredis.Redis.from_url(url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=STORE_KINDS)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreMaker]:
    """Opens stores of the test's kind; those of one test share state, like nodes do.

    Redis stores of one test share a fresh key prefix, so tests never see each other's keys.
    """
    kind: str = request.param
    opened: list[Store] = []
    prefix = f"test-{uuid.uuid4().hex}:"
    url = ""
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url
    memory_stores: dict[int, MemoryStore] = {}

    async def make(*, audit_cap: int = AUDIT_CAP) -> Store:
        store: Store
        if kind == "memory":
            # One process has one MemoryStore: a second handle is the same object.
            store = memory_stores.setdefault(audit_cap, MemoryStore(audit_cap=audit_cap))
        else:
            store = await RedisStore.connect(url, prefix=prefix, audit_cap=audit_cap)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
    if url:
        await _drop_prefix(url, prefix)


@pytest.fixture
async def store(make_store: StoreMaker) -> Store:
    return await make_store()
