"""Signalling protocol v1: validation of client messages (see docs/protocol.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 128 * 1024
MAX_SDP_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 4096
MAX_TRACKS = 8
ROOM_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
CONSULTATION_ID_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
PATIENT_REF_RE = re.compile(r"^Patient/[A-Za-z0-9.-]{1,64}$")  # a FHIR relative reference
SOURCES = frozenset({"camera", "microphone", "screen"})


class ProtocolError(Exception):
    """An invalid client message. ``code`` is a protocol error code."""

    def __init__(self, message: str, *, code: str = "bad_message", ref: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.ref = ref


@dataclass(frozen=True)
class Join:
    v: int
    room: str
    token: str


@dataclass(frozen=True)
class PublishOffer:
    sdp: str
    sources: dict[str, str]  # mid -> source


@dataclass(frozen=True)
class SubscribeAnswer:
    sdp: str


@dataclass(frozen=True)
class Mute:
    source: str
    muted: bool


@dataclass(frozen=True)
class Leave:
    pass


@dataclass(frozen=True)
class Ping:
    ts: float | None


@dataclass(frozen=True)
class RecordingStart:
    consultation_id: str | None = None
    patient_ref: str | None = None


@dataclass(frozen=True)
class RecordingStop:
    pass


@dataclass(frozen=True)
class Consent:
    granted: bool


ClientMessage = (
    Join
    | PublishOffer
    | SubscribeAnswer
    | Mute
    | Leave
    | Ping
    | RecordingStart
    | RecordingStop
    | Consent
)


def _field(msg: dict[str, Any], name: str, kind: type, ref: str) -> Any:
    if name not in msg:
        raise ProtocolError(f"'{name}' is required", ref=ref)
    value = msg[name]
    if kind is int and isinstance(value, bool):
        raise ProtocolError(f"'{name}' must be an integer", ref=ref)
    if not isinstance(value, kind):
        raise ProtocolError(f"'{name}' must be of type {kind.__name__}", ref=ref)
    return value


def _string(msg: dict[str, Any], name: str, ref: str, max_len: int) -> str:
    value: str = _field(msg, name, str, ref)
    if not value:
        raise ProtocolError(f"'{name}' must not be empty", ref=ref)
    if len(value) > max_len:
        raise ProtocolError(f"'{name}' is longer than {max_len} characters", ref=ref)
    return value


def parse_message(raw: str | bytes) -> ClientMessage:
    """Validate one WebSocket text message; raises ProtocolError naming what is wrong."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("message is not valid JSON") from exc
    if not isinstance(msg, dict):
        raise ProtocolError("message must be a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("'type' is required and must be a string")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(f"unknown message type '{kind[:40]}'", ref=kind[:40])
    return parser(msg)


def _join(msg: dict[str, Any]) -> Join:
    v = _field(msg, "v", int, "join")
    room = _string(msg, "room", "join", 128)
    if not ROOM_ID_RE.match(room):
        raise ProtocolError("'room' may contain only letters, digits, '_', '.', '-'", ref="join")
    token = _string(msg, "token", "join", MAX_TOKEN_CHARS)
    return Join(v=v, room=room, token=token)


def _publish_offer(msg: dict[str, Any]) -> PublishOffer:
    sdp = _sdp(msg, "publish_offer")
    tracks = _field(msg, "tracks", list, "publish_offer")
    if len(tracks) > MAX_TRACKS:
        raise ProtocolError(f"at most {MAX_TRACKS} tracks may be published", ref="publish_offer")
    sources: dict[str, str] = {}
    for i, track in enumerate(tracks):
        if not isinstance(track, dict):
            raise ProtocolError(f"tracks[{i}] must be an object", ref="publish_offer")
        mid = track.get("mid")
        source = track.get("source")
        if not isinstance(mid, str) or not MID_RE.match(mid):
            raise ProtocolError(f"tracks[{i}].mid is missing or invalid", ref="publish_offer")
        if source not in SOURCES:
            raise ProtocolError(
                f"tracks[{i}].source must be one of {sorted(SOURCES)}", ref="publish_offer"
            )
        sources[mid] = source
    return PublishOffer(sdp=sdp, sources=sources)


def _sdp(msg: dict[str, Any], ref: str) -> str:
    sdp = _string(msg, "sdp", ref, MAX_SDP_BYTES)
    if not sdp.startswith("v=0"):
        raise ProtocolError("'sdp' is not a session description", code="bad_sdp", ref=ref)
    return sdp


def _subscribe_answer(msg: dict[str, Any]) -> SubscribeAnswer:
    return SubscribeAnswer(sdp=_sdp(msg, "subscribe_answer"))


def _mute(msg: dict[str, Any]) -> Mute:
    source = _field(msg, "source", str, "mute")
    if source not in SOURCES:
        raise ProtocolError(f"'source' must be one of {sorted(SOURCES)}", ref="mute")
    muted = _field(msg, "muted", bool, "mute")
    return Mute(source=source, muted=muted)


def _leave(msg: dict[str, Any]) -> Leave:
    return Leave()


def _ping(msg: dict[str, Any]) -> Ping:
    ts = msg.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)):
        raise ProtocolError("'ts' must be a number", ref="ping")
    return Ping(ts=None if ts is None else float(ts))


def optional_pattern(
    msg: dict[str, Any], name: str, pattern: re.Pattern[str], ref: str, what: str
) -> str | None:
    """An optional string field that must match ``pattern`` when present."""
    value = msg.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(f"'{name}' must be {what}", ref=ref)
    return value


def _recording_start(msg: dict[str, Any]) -> RecordingStart:
    ref = "recording_start"
    return RecordingStart(
        consultation_id=optional_pattern(
            msg, "consultation_id", CONSULTATION_ID_RE, ref, "1-128 of [A-Za-z0-9_.:/-]"
        ),
        patient_ref=optional_pattern(msg, "patient_ref", PATIENT_REF_RE, ref, "'Patient/<id>'"),
    )


def _recording_stop(msg: dict[str, Any]) -> RecordingStop:
    return RecordingStop()


def _consent(msg: dict[str, Any]) -> Consent:
    return Consent(granted=_field(msg, "granted", bool, "consent"))


_PARSERS: dict[str, Callable[[dict[str, Any]], ClientMessage]] = {
    "join": _join,
    "publish_offer": _publish_offer,
    "subscribe_answer": _subscribe_answer,
    "mute": _mute,
    "leave": _leave,
    "ping": _ping,
    "recording_start": _recording_start,
    "recording_stop": _recording_stop,
    "consent": _consent,
}


def error_message(code: str, message: str, ref: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        out["ref"] = ref
    return out
