"""Rooms and participants as signalling sees them (who is here, what they may do)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from media_server.room import MediaParticipant
from media_server.rtc import ice_servers_json
from media_server.sfu import Sfu
from recording.recorder import (
    ParticipantInfo,
    Recorder,
    RecorderStateError,
    RecordingOptions,
    StopResult,
)
from recording.registry import NotRecording, RecordingActive, Recordings, RecordingStartFailed

from .auth import Claims, Grant
from .errors import KonsiliumError
from .protocol import PROTOCOL_VERSION
from .room_settings import RoomSettings
from .store import AuditEvent, ParticipantRecord, RoomRecord, Store

logger = logging.getLogger(__name__)

SOURCES = ("camera", "microphone", "screen")
RECONNECT_GRACE_S = 30.0  # a dropped participant keeps its place this long


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
    state: str = "active"  # "active" | "reconnecting" (link dropped, within the grace period)
    grace: asyncio.TimerHandle | None = None

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
            "state": self.state,
        }


class RecordingRefused(KonsiliumError):
    """A recording request the room's state does not allow (WebSocket error / HTTP 409)."""

    code = "recording_refused"
    status = 409


class Room:
    def __init__(self, room_id: str) -> None:
        self.id = room_id
        self.participants: dict[str, Participant] = {}
        self.lock = asyncio.Lock()
        self.auto_recorded = False  # auto_record fires once while the room is live

    def __repr__(self) -> str:
        return f"Room({self.id})"

    async def broadcast(self, message: dict[str, Any], exclude: str | None = None) -> None:
        targets = [p for pid, p in self.participants.items() if pid != exclude]
        await asyncio.gather(*(p.connection.send(message) for p in targets))


class RoomRegistry:
    """All rooms of this node; joins and leaves go through here."""

    def __init__(
        self,
        store: Store,
        sfu: Sfu,
        node_id: str,
        recordings: Recordings | None = None,
        reconnect_grace_s: float = RECONNECT_GRACE_S,
    ) -> None:
        self.reconnect_grace_s = reconnect_grace_s
        self.store = store
        self.sfu = sfu
        self.node_id = node_id
        self.rooms: dict[str, Room] = {}
        self.recordings = recordings
        self._stopped_by: dict[str, str] = {}  # recording id -> who asked for the stop
        self._tasks: set[asyncio.Task[None]] = set()
        if recordings is not None:
            recordings.stopped_listeners.append(self._recording_stopped)

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
                return await self._resume(room, old, claims, connection, on_media_failed)
            participant = Participant(claims=claims, connection=connection)
            await self.store.create_room(
                RoomRecord(id=room.id, title=room.id, created_at=time.time(), settings={})
            )
            await self.store.upsert_participant(self._record(room, participant))
            room.participants[participant.id] = participant
            await self._admit(room, participant, on_media_failed, resumed=False)
        logger.info("%r: %s joined as %s", room, participant.id, claims.role)
        if not room.auto_recorded and self.recordings is not None:
            self._spawn(self._auto_record(room))
        return participant

    async def _auto_record(self, room: Room) -> None:
        """A room configured with ``auto_record`` is recorded from its first join."""
        settings = await self._room_settings(room.id)
        if not settings.auto_record or room.auto_recorded or self._recorder(room.id) is not None:
            return
        room.auto_recorded = True
        try:
            await self.start_recording(room.id, started_by="auto")
        except KonsiliumError as exc:
            logger.warning("%r: automatic recording did not start: %s", room, exc.code)

    async def _resume(
        self,
        room: Room,
        participant: Participant,
        claims: Claims,
        connection: Connection,
        on_media_failed: Callable[[], None],
    ) -> Participant:
        """The same identity is back (after a link drop, or from a new tab): same place.

        The old connection, if still open, is closed; the media starts anew (new peer
        connections, tracks re-published); the others see ``participant_updated``
        (state back to active), never left-and-joined.
        """
        if participant.grace is not None:
            participant.grace.cancel()
            participant.grace = None
        old_connection = participant.connection
        participant.connection = connection
        participant.claims = claims
        media, participant.media = participant.media, None
        if media is not None:
            await media.room.leave(participant.id)
        if participant.state == "active" and old_connection is not connection:
            await old_connection.kick(
                "replaced", "the same identity joined from another connection", 4409
            )
        participant.state = "active"
        await self.store.upsert_participant(self._record(room, participant))
        await self._admit(room, participant, on_media_failed, resumed=True)
        logger.info("%r: %s resumed", room, participant.id)
        return participant

    async def _admit(
        self,
        room: Room,
        participant: Participant,
        on_media_failed: Callable[[], None],
        *,
        resumed: bool,
    ) -> None:
        """Tell the participant it is in, tell the others, and start its media."""
        connection = participant.connection
        others = [p for p in room.participants.values() if p is not participant]
        joined: dict[str, Any] = {
            "type": "joined",
            "v": PROTOCOL_VERSION,
            "participant": participant.to_json(),
            "room": {"id": room.id, "participants": [p.to_json() for p in others]},
            "ice_servers": ice_servers_json(self.sfu.ice_urls),
        }
        if resumed:
            joined["resumed"] = True
        await connection.send(joined)
        recorder = self._recorder(room.id)
        if recorder is not None:
            recorder.participant_joined(participant_info(participant))
            await connection.send({"type": "recording_started", **recorder.status()})
        await room.broadcast(
            {
                "type": "participant_updated" if resumed else "participant_joined",
                "participant": participant.to_json(),
            },
            exclude=participant.id,
        )
        claims = participant.claims
        participant.media = await self.sfu.room(room.id).join(
            participant.id,
            _SubscriberEvents(connection.send),
            can_publish=claims.has(Grant.PUBLISH),
            can_subscribe=claims.has(Grant.SUBSCRIBE),
            on_failed=on_media_failed,
        )

    async def leave(
        self, participant: Participant, reason: str, connection: Connection | None = None
    ) -> None:
        """``connection``: the one that ended; ignored if the participant has a newer one.

        A connection that dropped (``disconnected``) keeps the participant's place for
        ``reconnect_grace_s``: its media stops at once (its tracks disappear for the
        others), the others see it ``reconnecting``, and only if it does not come back
        in time does it leave.
        """
        room = self.rooms.get(participant.claims.room)
        if room is None:
            return
        async with room.lock:
            if room.participants.get(participant.id) is not participant:
                return
            if connection is not None and participant.connection is not connection:
                return  # an old connection of a participant that already came back
            if reason == "disconnected" and self.reconnect_grace_s > 0:
                if participant.state == "active":
                    await self._suspend(room, participant)
                return
            await self._remove(room, participant, reason)
        await self._release_if_empty(room)

    async def _suspend(self, room: Room, participant: Participant) -> None:
        participant.state = "reconnecting"
        media, participant.media = participant.media, None
        if media is not None:
            await media.room.leave(participant.id)
        await self.store.upsert_participant(self._record(room, participant))
        await room.broadcast(
            {"type": "participant_updated", "participant": participant.to_json()},
            exclude=participant.id,
        )
        loop = asyncio.get_running_loop()
        participant.grace = loop.call_later(
            self.reconnect_grace_s,
            lambda: self._spawn_expiry(room, participant),
        )
        logger.info(
            "%r: %s reconnecting (grace %.0f s)", room, participant.id, self.reconnect_grace_s
        )

    def _spawn_expiry(self, room: Room, participant: Participant) -> None:
        self._spawn(self._expire(room, participant))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, room: Room, participant: Participant) -> None:
        async with room.lock:
            if room.participants.get(participant.id) is not participant:
                return
            if participant.state != "reconnecting":
                return
            participant.grace = None
            await self._remove(room, participant, "disconnected")
        await self._release_if_empty(room)

    async def _release_if_empty(self, room: Room) -> None:
        if not room.participants and self._recorder(room.id) is not None:
            with contextlib.suppress(KonsiliumError):
                await self.stop_recording(room.id, by="server", reason="room_empty")
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
        recorder = self._recorder(room.id)
        if recorder is not None and recorder.participant_left(participant.id, reason):
            await room.broadcast({"type": "recording_status", **recorder.status()})
        logger.info("%r: %s left (%s)", room, participant.id, reason)

    async def set_muted(self, participant: Participant, source: str, muted: bool) -> None:
        room = self.rooms.get(participant.claims.room)
        if room is None or participant.muted.get(source) == muted:
            return
        participant.muted[source] = muted
        recorder = self._recorder(room.id)
        if recorder is not None:
            recorder.muted(participant.id, source, muted)
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

    # -- recording ------------------------------------------------------------

    def _recorder(self, room_id: str) -> Recorder | None:
        recorder = self.recordings.get(room_id) if self.recordings is not None else None
        return recorder if recorder is not None and recorder.recording else None

    async def start_recording(
        self,
        room_id: str,
        *,
        started_by: str,
        consultation_id: str | None = None,
        patient_ref: str | None = None,
        consent_required: bool | None = None,
    ) -> Recorder:
        """Start recording a live room and tell everyone in it (``recording_started``).

        ``consent_required``, ``consultation_id`` and ``patient_ref`` not given take
        the room's settings (see :mod:`signalling.room_settings`).
        """
        if self.recordings is None:
            raise RecordingRefused("recording is not available", code="recording_unavailable")
        room = self.rooms.get(room_id)
        media_room = self.sfu.rooms.get(room_id)
        if room is None or not room.participants or media_room is None:
            raise RecordingRefused("nobody is in the room", code="room_not_live")
        settings = await self._room_settings(room_id)
        if consent_required is None:
            consent_required = settings.consent_required
        consultation_id = consultation_id or settings.consultation_id
        patient_ref = patient_ref or settings.patient_ref
        options = RecordingOptions(consultation_id, patient_ref, consent_required)
        async with room.lock:
            if not room.participants or self.sfu.rooms.get(room_id) is not media_room:
                raise RecordingRefused("nobody is in the room", code="room_not_live")
            people = [participant_info(p) for p in room.participants.values()]
            try:
                recorder = await self.recordings.start(
                    room_id, media_room, people, started_by=started_by, options=options
                )
            except RecordingActive:
                raise RecordingRefused(
                    "the room is already being recorded", code="recording_active"
                ) from None
            except RecordingStartFailed as exc:
                code = "disk_full" if exc.disk_full else "recording_failed"
                status = 507 if exc.disk_full else 500
                raise KonsiliumError(str(exc), code=code, status=status) from exc
            await room.broadcast({"type": "recording_started", **recorder.status()})
        await self.audit(started_by, "recording_start", recorder.id, "ok", room=room_id)
        return recorder

    async def stop_recording(
        self, room_id: str, *, by: str, reason: str = "stopped"
    ) -> tuple[Recorder, StopResult]:
        """Stop the room's recording; everyone in the room gets ``recording_stopped``."""
        recorder = self.recordings.get(room_id) if self.recordings is not None else None
        if self.recordings is None or recorder is None:
            raise RecordingRefused("the room is not being recorded", code="not_recording")
        self._stopped_by.setdefault(recorder.id, by)
        try:
            return await self.recordings.stop(room_id, reason)
        except NotRecording:
            raise RecordingRefused("the room is not being recorded", code="not_recording") from None

    async def recording_consent(self, participant: Participant, granted: bool) -> None:
        """A participant's answer: into the manifest, and ``recording_status`` to the room."""
        room = self.rooms.get(participant.claims.room)
        recorder = self._recorder(participant.claims.room)
        if room is None or recorder is None:
            raise RecordingRefused("the room is not being recorded", code="not_recording")
        try:
            recorder.set_consent(participant.id, granted)
        except RecorderStateError:
            raise RecordingRefused("the room is not being recorded", code="not_recording") from None
        outcome = "granted" if granted else "declined"
        await room.broadcast({"type": "recording_status", **recorder.status()})
        await self.audit(participant.id, "recording_consent", recorder.id, outcome)

    async def _recording_stopped(self, recorder: Recorder, result: StopResult) -> None:
        """Recordings listener: every stop, whatever its cause, reaches the room and the log."""
        by = self._stopped_by.pop(recorder.id, "server")
        room = self.rooms.get(recorder.room_id)
        if room is not None:
            await room.broadcast(
                {"type": "recording_stopped", "recording_id": recorder.id, "reason": result.reason}
            )
        outcome = "sealed" if result.sealed else "not_sealed"
        await self.audit(
            by, "recording_stop", recorder.id, outcome, room=recorder.room_id, reason=result.reason
        )

    async def _room_settings(self, room_id: str) -> RoomSettings:
        try:
            record = await self.store.get_room(room_id)
        except Exception:
            logger.exception("room %s: settings unreadable, defaults used", room_id)
            return RoomSettings()
        return RoomSettings() if record is None else RoomSettings.from_record(record.settings)

    async def audit(
        self, actor: str, action: str, target: str, outcome: str, **detail: object
    ) -> None:
        """Append to the Store's audit log; a failing store is logged, never raised."""
        try:
            await self.store.append_audit(
                AuditEvent(
                    at=time.time(),
                    actor=actor,
                    action=action,
                    target=target,
                    outcome=outcome,
                    detail=dict(detail),
                )
            )
        except Exception:
            logger.exception("audit write failed (%s %s)", action, target)

    async def close(self) -> None:
        if self.recordings is not None:
            await self.recordings.stop_all("shutdown")
        for room in list(self.rooms.values()):
            for participant in list(room.participants.values()):
                if participant.grace is not None:
                    participant.grace.cancel()
                await participant.connection.kick("shutdown", "the server is shutting down", 1001)
                await self.leave(participant, "shutdown")
        for task in list(self._tasks):
            task.cancel()


def participant_info(participant: Participant) -> ParticipantInfo:
    c = participant.claims
    return ParticipantInfo(id=c.sub, name=c.name, clinic=c.clinic, tier=str(c.tier), role=c.role)


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

    async def video_layer(self, track: dict[str, str], layer: str, reason: str) -> None:
        await self._send(
            {"type": "video_quality", "track": track, "layer": layer, "reason": reason}
        )

    async def audio_mode(self, state: dict[str, Any]) -> None:
        await self._send({"type": "audio_mode", **state})

    async def active_speaker(self, participant_id: str | None) -> None:
        await self._send({"type": "active_speaker", "participant_id": participant_id})
