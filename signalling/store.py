"""The Store contract: rooms, participants and the audit log.

One contract, two implementations: :class:`MemoryStore` here (the embedded
default) and ``signalling.store_redis.RedisStore`` (scale-out). Both go through
the same JSON codec below, so a value that round-trips through one round-trips
through the other, and a value that cannot be stored fails the same way in both.

Contract, beyond the method signatures:

- Records are immutable; ``settings`` and ``detail`` must be JSON values (dicts
  with string keys, lists, strings, finite numbers, booleans, ``None``). What
  comes back equals what went in, except that tuples come back as lists.
- ``list_rooms`` is ordered by ``created_at`` (then id); ``list_participants`` by
  ``joined_at`` (then participant id); ``list_audit`` newest first.
- ``upsert_participant`` needs the room to exist (:class:`UnknownRoom`
  otherwise), so a deleted room never keeps participants.
- The audit log keeps the newest ``audit_cap`` entries (100 000 by default).
- Every failure is a :class:`StoreError`; after ``close()`` every call but
  ``close()`` raises it.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from signalling.errors import KonsiliumError

AUDIT_CAP = 100_000
PARTICIPANT_STATES = ("active", "reconnecting")


class StoreError(KonsiliumError):
    """The store failed or refused a value (backend down, corrupt record, bad value)."""

    code = "store_error"
    status = 503


class UnknownRoom(StoreError):
    """A participant was written to a room that does not exist."""

    code = "room_not_found"
    status = 404


@dataclass(frozen=True, slots=True)
class RoomRecord:
    id: str
    title: str
    created_at: float
    settings: dict[str, object]


@dataclass(frozen=True, slots=True)
class ParticipantRecord:
    room_id: str
    participant_id: str
    name: str
    clinic: str
    tier: str
    role: str
    node_id: str
    joined_at: float
    state: str  # "active" | "reconnecting"

    def __post_init__(self) -> None:
        if self.state not in PARTICIPANT_STATES:
            raise ValueError(
                f"participant state must be one of {PARTICIPANT_STATES}, not {self.state!r}"
            )


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, object]


@runtime_checkable
class Store(Protocol):
    """State shared by every node: rooms, who is in them, and the audit log."""

    async def create_room(self, room: RoomRecord) -> bool:
        """Store a new room; False (and no change) if a room with that id exists."""
        ...

    async def put_room(self, room: RoomRecord) -> None:
        """Store a room, replacing one with the same id (its title and settings change)."""
        ...

    async def get_room(self, room_id: str) -> RoomRecord | None: ...

    async def list_rooms(self) -> list[RoomRecord]:
        """All rooms, oldest first."""
        ...

    async def delete_room(self, room_id: str) -> bool:
        """Drop a room and its participants; False if there was no such room."""
        ...

    async def upsert_participant(self, p: ParticipantRecord) -> None:
        """Insert or replace a participant; raises UnknownRoom if the room is missing."""
        ...

    async def get_participant(self, room_id: str, pid: str) -> ParticipantRecord | None: ...

    async def remove_participant(self, room_id: str, pid: str) -> bool:
        """False if the participant was not there."""
        ...

    async def list_participants(self, room_id: str) -> list[ParticipantRecord]:
        """Participants of a room ordered by ``joined_at``; empty for an unknown room."""
        ...

    async def append_audit(self, event: AuditEvent) -> None: ...

    async def list_audit(self, limit: int = 100, action: str | None = None) -> list[AuditEvent]:
        """Newest first, at most ``limit``, only ``action`` when given."""
        ...

    async def close(self) -> None:
        """Release resources; safe to call twice."""
        ...


# --- codec shared by every implementation -------------------------------------------


def dump_json(value: object) -> str:
    """Serialize for storage; StoreError if ``value`` is not a JSON value."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"value cannot be stored: {exc}") from exc


def _load_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"corrupt {what} record") from exc
    if not isinstance(value, dict):
        raise StoreError(f"corrupt {what} record")
    return value


def _json_keys(value: object, what: str) -> None:
    """Reject non-string dict keys: JSON would silently turn them into strings."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"{what} keys must be strings, not {key!r}")
            _json_keys(item, what)
    elif isinstance(value, list | tuple):
        for item in value:
            _json_keys(item, what)


def encode_room(room: RoomRecord) -> str:
    _json_keys(room.settings, "room settings")
    return dump_json(asdict(room))


def decode_room(text: str | bytes) -> RoomRecord:
    data = _load_object(text, "room")
    try:
        return RoomRecord(
            id=data["id"],
            title=data["title"],
            created_at=data["created_at"],
            settings=data["settings"],
        )
    except (KeyError, TypeError) as exc:
        raise StoreError("corrupt room record") from exc


def encode_participant(p: ParticipantRecord) -> str:
    return dump_json(asdict(p))


def decode_participant(text: str | bytes) -> ParticipantRecord:
    data = _load_object(text, "participant")
    try:
        return ParticipantRecord(**data)
    except (TypeError, ValueError) as exc:
        raise StoreError("corrupt participant record") from exc


def encode_audit(event: AuditEvent) -> str:
    _json_keys(event.detail, "audit detail")
    return dump_json(asdict(event))


def decode_audit(text: str | bytes) -> AuditEvent:
    return audit_from_dict(_load_object(text, "audit"))


def audit_from_dict(data: object) -> AuditEvent:
    if not isinstance(data, dict):
        raise StoreError("corrupt audit record")
    try:
        return AuditEvent(**data)
    except TypeError as exc:
        raise StoreError("corrupt audit record") from exc


def check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")


def room_order(room: RoomRecord) -> tuple[float, str]:
    return (room.created_at, room.id)


def participant_order(p: ParticipantRecord) -> tuple[float, str]:
    return (p.joined_at, p.participant_id)


# --- the embedded default ------------------------------------------------------------


class MemoryStore:
    """In-process store. Values are kept encoded, exactly as Redis would keep them.

    Every method runs without awaiting anything, so it is atomic on the event loop.
    """

    def __init__(self, *, audit_cap: int = AUDIT_CAP) -> None:
        if audit_cap < 1:
            raise ValueError("audit_cap must be >= 1")
        self._rooms: dict[str, str] = {}
        self._participants: dict[str, dict[str, str]] = {}
        self._audit: deque[tuple[str, str]] = deque(maxlen=audit_cap)  # (action, encoded)
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryStore rooms={len(self._rooms)} closed={self._closed}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    async def create_room(self, room: RoomRecord) -> bool:
        self._check_open()
        encoded = encode_room(room)
        if room.id in self._rooms:
            return False
        self._rooms[room.id] = encoded
        return True

    async def put_room(self, room: RoomRecord) -> None:
        self._check_open()
        self._rooms[room.id] = encode_room(room)

    async def get_room(self, room_id: str) -> RoomRecord | None:
        self._check_open()
        encoded = self._rooms.get(room_id)
        return None if encoded is None else decode_room(encoded)

    async def list_rooms(self) -> list[RoomRecord]:
        self._check_open()
        return sorted((decode_room(v) for v in self._rooms.values()), key=room_order)

    async def delete_room(self, room_id: str) -> bool:
        self._check_open()
        self._participants.pop(room_id, None)
        return self._rooms.pop(room_id, None) is not None

    async def upsert_participant(self, p: ParticipantRecord) -> None:
        self._check_open()
        encoded = encode_participant(p)
        if p.room_id not in self._rooms:
            raise UnknownRoom(f"no room {p.room_id!r}")
        self._participants.setdefault(p.room_id, {})[p.participant_id] = encoded

    async def get_participant(self, room_id: str, pid: str) -> ParticipantRecord | None:
        self._check_open()
        encoded = self._participants.get(room_id, {}).get(pid)
        return None if encoded is None else decode_participant(encoded)

    async def remove_participant(self, room_id: str, pid: str) -> bool:
        self._check_open()
        return self._participants.get(room_id, {}).pop(pid, None) is not None

    async def list_participants(self, room_id: str) -> list[ParticipantRecord]:
        self._check_open()
        members = self._participants.get(room_id, {}).values()
        return sorted((decode_participant(v) for v in members), key=participant_order)

    async def append_audit(self, event: AuditEvent) -> None:
        self._check_open()
        self._audit.appendleft((event.action, encode_audit(event)))

    async def list_audit(self, limit: int = 100, action: str | None = None) -> list[AuditEvent]:
        self._check_open()
        check_limit(limit)
        found: list[AuditEvent] = []
        for event_action, encoded in self._audit:
            if len(found) >= limit:
                break
            if action is None or event_action == action:
                found.append(decode_audit(encoded))
        return found

    async def close(self) -> None:
        self._closed = True
