"""The Store contract on Redis, for more than one node.

Keys, under a configurable prefix (``konsilium:`` by default):

- ``rooms``: hash, room id -> room JSON (``HSETNX`` makes ``create_room`` atomic).
- ``room:{id}:participants``: hash, participant id -> participant JSON.
- ``audit``: list, newest first, of ``{"seq": n, "event": {...}}``, capped with ``LTRIM``.
- ``audit:action:{action}``: the same entries for one action, also capped, so a
  filtered query reads ``limit`` entries instead of scanning the log. Its entries
  older than the newest ``audit_cap`` of the whole log are dropped by ``seq``.
- ``audit:seq``: the counter that numbers audit entries.

Writes that touch more than one key run as one Lua script or one MULTI block.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aredis
from redis.exceptions import RedisError

from signalling.store import (
    AUDIT_CAP,
    AuditEvent,
    ParticipantRecord,
    RoomRecord,
    StoreError,
    UnknownRoom,
    audit_from_dict,
    check_limit,
    decode_participant,
    decode_room,
    encode_audit,
    encode_participant,
    encode_room,
    participant_order,
    room_order,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "konsilium:"

# KEYS: rooms hash, participants hash. ARGV: room id, participant id, participant JSON.
_UPSERT_PARTICIPANT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: seq counter, audit list, per-action list. ARGV: event JSON, cap.
_APPEND_AUDIT = """
local seq = redis.call('INCR', KEYS[1])
local entry = '{"seq":' .. seq .. ',"event":' .. ARGV[1] .. '}'
local last = tonumber(ARGV[2]) - 1
redis.call('LPUSH', KEYS[2], entry)
redis.call('LTRIM', KEYS[2], 0, last)
redis.call('LPUSH', KEYS[3], entry)
redis.call('LTRIM', KEYS[3], 0, last)
return seq
"""


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _audit_entry(text: str | bytes) -> tuple[int, AuditEvent]:
    try:
        data = json.loads(text)
        seq = int(data["seq"])
        event = data["event"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError("corrupt audit entry") from exc
    return seq, audit_from_dict(event)


class RedisStore:
    """Store on a Redis server; values are the JSON of the records."""

    def __init__(
        self,
        client: aredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        audit_cap: int = AUDIT_CAP,
        where: str = "redis",
    ) -> None:
        """Wrap ``client`` (made with ``decode_responses=True``); the store closes it."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        if audit_cap < 1:
            raise ValueError("audit_cap must be >= 1")
        self._redis = client
        self._prefix = prefix
        self._audit_cap = audit_cap
        self._where = where
        self._closed = False
        self._rooms_key = f"{prefix}rooms"
        self._audit_key = f"{prefix}audit"
        self._seq_key = f"{prefix}audit:seq"
        self._upsert = client.register_script(_UPSERT_PARTICIPANT)
        self._append = client.register_script(_APPEND_AUDIT)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        audit_cap: int = AUDIT_CAP,
    ) -> RedisStore:
        """Connect to ``url`` (``redis://host:port/db``) and check that it answers."""
        where = redact_url(url)
        try:
            client = aredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5)
        except ValueError as exc:
            raise StoreError(f"bad redis url {where!r}: {exc}") from exc
        store = cls(client, prefix=prefix, audit_cap=audit_cap, where=where)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await store.close()
            raise StoreError(f"cannot reach redis at {where}: {exc}") from exc
        log.info("redis store %s prefix %r connected", where, prefix)
        return store

    def __repr__(self) -> str:
        return f"<RedisStore {self._where} prefix={self._prefix!r} closed={self._closed}>"

    def _participants_key(self, room_id: str) -> str:
        return f"{self._prefix}room:{room_id}:participants"

    def _action_key(self, action: str) -> str:
        return f"{self._prefix}audit:action:{action}"

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Refuse calls after close(); turn Redis failures into StoreError."""
        if self._closed:
            raise StoreError("store is closed")
        try:
            yield
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis {what} failed on {self._where}: {exc}") from exc

    async def create_room(self, room: RoomRecord) -> bool:
        encoded = encode_room(room)
        with self._call("create_room"):
            return bool(await self._redis.hsetnx(self._rooms_key, room.id, encoded))

    async def put_room(self, room: RoomRecord) -> None:
        encoded = encode_room(room)
        with self._call("put_room"):
            await self._redis.hset(self._rooms_key, room.id, encoded)

    async def get_room(self, room_id: str) -> RoomRecord | None:
        with self._call("get_room"):
            encoded = await self._redis.hget(self._rooms_key, room_id)
        return None if encoded is None else decode_room(encoded)

    async def list_rooms(self) -> list[RoomRecord]:
        with self._call("list_rooms"):
            values = await self._redis.hvals(self._rooms_key)
        return sorted((decode_room(v) for v in values), key=room_order)

    async def delete_room(self, room_id: str) -> bool:
        with self._call("delete_room"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self._rooms_key, room_id)
                pipe.delete(self._participants_key(room_id))
                removed, _ = await pipe.execute()
        return bool(removed)

    async def upsert_participant(self, p: ParticipantRecord) -> None:
        encoded = encode_participant(p)
        keys = [self._rooms_key, self._participants_key(p.room_id)]
        with self._call("upsert_participant"):
            stored = await self._upsert(keys=keys, args=[p.room_id, p.participant_id, encoded])
        if not stored:
            raise UnknownRoom(f"no room {p.room_id!r}")

    async def get_participant(self, room_id: str, pid: str) -> ParticipantRecord | None:
        with self._call("get_participant"):
            encoded = await self._redis.hget(self._participants_key(room_id), pid)
        return None if encoded is None else decode_participant(encoded)

    async def remove_participant(self, room_id: str, pid: str) -> bool:
        with self._call("remove_participant"):
            return bool(await self._redis.hdel(self._participants_key(room_id), pid))

    async def list_participants(self, room_id: str) -> list[ParticipantRecord]:
        with self._call("list_participants"):
            values = await self._redis.hvals(self._participants_key(room_id))
        return sorted((decode_participant(v) for v in values), key=participant_order)

    async def append_audit(self, event: AuditEvent) -> None:
        encoded = encode_audit(event)
        keys = [self._seq_key, self._audit_key, self._action_key(event.action)]
        with self._call("append_audit"):
            await self._append(keys=keys, args=[encoded, self._audit_cap])

    async def list_audit(self, limit: int = 100, action: str | None = None) -> list[AuditEvent]:
        with self._call("list_audit"):
            check_limit(limit)
            if limit == 0:
                return []
            if action is None:
                values = await self._redis.lrange(self._audit_key, 0, limit - 1)
                return [_audit_entry(v)[1] for v in values]
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._seq_key)
                pipe.lrange(self._action_key(action), 0, limit - 1)
                last_seq, values = await pipe.execute()
        # Entries of this action that the whole log has already trimmed away.
        oldest_kept = int(last_seq or 0) - self._audit_cap
        found: list[AuditEvent] = []
        for value in values:
            seq, event = _audit_entry(value)
            if seq <= oldest_kept:
                break
            found.append(event)
        return found

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._redis.aclose()
        except (RedisError, OSError) as exc:
            log.warning("redis store %s: error while closing: %s", self._where, exc)
