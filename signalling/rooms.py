"""Rooms and participants as signalling sees them (who is here, what they may do)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from media_server.room import MediaParticipant
from media_server.rtc import ice_servers_json
from media_server.sfu import Sfu

from .auth import Claims, Grant
from .protocol import PROTOCOL_VERSION
from .store import ParticipantRecord, RoomRecord, Store

logger = logging.getLogger(__name__)

SOURCES = ("camera", "microphone", "screen")


class Connection(Protocol):
    """The participant's signalling channel (a WebSocket session)."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def kick(self, code: str, message: str, close_code: int) -> None: ...


@dataclass
class Participant:
    claims: Claims
    connection: Connection
    joined_at: float = field(default_factory=time.time)
    muted: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(SOURCES, False))
    media: MediaParticipant | None = None

    @property
    def id(self) -> str:
        return self.claims.sub

    def to_json(self) -> dict[str, Any]:
        c = self.claims
        return {
            "id": c.sub,
            "name": c.name,
            "clinic": c.clinic,
            "tier": str(c.tier),
            "role": c.role,
            "grants": sorted(str(g) for g in c.grants),
            "muted": dict(self.muted),
        }


class Room:
    def __init__(self, room_id: str) -> None:
        self.id = room_id
        self.participants: dict[str, Participant] = {}
        self.lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Room({self.id})"

    async def broadcast(self, message: dict[str, Any], exclude: str | None = None) -> None:
        targets = [p for pid, p in self.participants.items() if pid != exclude]
        await asyncio.gather(*(p.connection.send(message) for p in targets))


class RoomRegistry:
    """All rooms of this node; joins and leaves go through here."""

    def __init__(self, store: Store, sfu: Sfu, node_id: str) -> None:
        self.store = store
        self.sfu = sfu
        self.node_id = node_id
        self.rooms: dict[str, Room] = {}

    def room(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = Room(room_id)
        return room

    async def join(
        self, claims: Claims, connection: Connection, on_media_failed: Callable[[], None]
    ) -> Participant:
        room = self.room(claims.room)
        async with room.lock:
            old = room.participants.get(claims.sub)
            if old is not None:
                await self._remove(room, old, "replaced")
                await old.connection.kick(
                    "replaced", "the same identity joined from another connection", 4409
                )
            participant = Participant(claims=claims, connection=connection)
            await self.store.create_room(
                RoomRecord(id=room.id, title=room.id, created_at=time.time(), settings={})
            )
            await self.store.upsert_participant(self._record(room, participant))
            others = list(room.participants.values())
            room.participants[participant.id] = participant
            await connection.send(
                {
                    "type": "joined",
                    "v": PROTOCOL_VERSION,
                    "participant": participant.to_json(),
                    "room": {"id": room.id, "participants": [p.to_json() for p in others]},
                    "ice_servers": ice_servers_json(self.sfu.ice_urls),
                }
            )
            await room.broadcast(
                {"type": "participant_joined", "participant": participant.to_json()},
                exclude=participant.id,
            )
            media_room = self.sfu.room(room.id)
            participant.media = await media_room.join(
                participant.id,
                _SubscriberEvents(connection.send),
                can_publish=claims.has(Grant.PUBLISH),
                can_subscribe=claims.has(Grant.SUBSCRIBE),
                on_failed=on_media_failed,
            )
        logger.info("%r: %s joined as %s", room, participant.id, claims.role)
        return participant

    async def leave(self, participant: Participant, reason: str) -> None:
        room = self.rooms.get(participant.claims.room)
        if room is None:
            return
        async with room.lock:
            if room.participants.get(participant.id) is participant:
                await self._remove(room, participant, reason)
        if not room.participants and self.rooms.get(room.id) is room:
            del self.rooms[room.id]
            await self.sfu.release_if_empty(room.id)

    async def _remove(self, room: Room, participant: Participant, reason: str) -> None:
        del room.participants[participant.id]
        media, participant.media = participant.media, None
        if media is not None:
            await media.room.leave(participant.id)
        await self.store.remove_participant(room.id, participant.id)
        await room.broadcast(
            {"type": "participant_left", "participant_id": participant.id, "reason": reason}
        )
        logger.info("%r: %s left (%s)", room, participant.id, reason)

    async def set_muted(self, participant: Participant, source: str, muted: bool) -> None:
        room = self.rooms.get(participant.claims.room)
        if room is None or participant.muted.get(source) == muted:
            return
        participant.muted[source] = muted
        await room.broadcast({"type": "participant_updated", "participant": participant.to_json()})

    def _record(self, room: Room, participant: Participant) -> ParticipantRecord:
        c = participant.claims
        return ParticipantRecord(
            room_id=room.id,
            participant_id=c.sub,
            name=c.name,
            clinic=c.clinic,
            tier=str(c.tier),
            role=c.role,
            node_id=self.node_id,
            joined_at=participant.joined_at,
            state="active",
        )

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            for participant in list(room.participants.values()):
                await participant.connection.kick("shutdown", "the server is shutting down", 1001)
                await self.leave(participant, "disconnected")


class _SubscriberEvents:
    """Turns subscriber-connection events into protocol messages."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._send = send

    async def subscribe_offer(self, sdp: str, tracks: list[dict[str, str]]) -> None:
        await self._send({"type": "subscribe_offer", "sdp": sdp, "tracks": tracks})

    async def track_published(self, track: dict[str, str]) -> None:
        await self._send({"type": "track_published", "track": track})

    async def track_unpublished(self, track: dict[str, str]) -> None:
        await self._send({"type": "track_unpublished", "track": track})
