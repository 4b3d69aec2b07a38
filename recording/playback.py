"""Playback of a recording: what the player page shows, and one playable file per track.

:func:`playback_view` turns the (decrypted) manifest into what a person reviews:
who took part (name, clinic, tier, role, consent), which tracks exist and where
they start on the session clock, and a timeline of what happened (recording
start and stop, joins, leaves, mutes, consent).  It is pure: no I/O.

A track is recorded as segment files of a few seconds; browsers play one file.
:func:`build_track_copy` concatenates a track's segments (packets copied, no
transcoding) into ``<recording>/playback/<track_id>.webm``, after checking each
segment against its SHA-256 in the manifest (an altered segment is left out, and
logged).  The copy is encrypted like the recording when a keyring is given; it
lives outside ``tracks/`` and so is not part of the record ``verify`` checks.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import av

from recording.errors import RecordingError
from recording.keyring import Keyring
from recording.render_jobs import COMPOSITE_NAME as COMPOSITE_NAME  # where renders put it
from recording.segments import SegmentInfo, validate_track_id
from recording.storage import MediaOutput, SegmentAltered, read_entries, read_segment

log = logging.getLogger(__name__)

PLAYBACK_DIR = "playback"
TIMELINE_EVENTS = frozenset(
    {"join", "leave", "mute", "unmute", "capture_started", "consent_pending", "recovered"}
)


class PlaybackError(RecordingError):
    """The track cannot be played (unknown, nothing recorded, unreadable)."""


@dataclass(frozen=True, slots=True)
class Person:
    id: str
    name: str
    clinic: str
    tier: str
    role: str
    consent: str  # granted, declined, pending


@dataclass(frozen=True, slots=True)
class TrackView:
    track_id: str
    participant_id: str
    kind: str  # audio, video
    source: str  # camera, microphone, screen, …
    offset_s: float  # where it starts on the session clock
    segments: int


@dataclass(frozen=True, slots=True)
class Moment:
    """One line of the timeline: ``kind`` is an event kind, or recording_started/stopped,
    consent_granted / consent_declined."""

    offset_s: float
    kind: str
    participant_id: str | None = None
    detail: str = ""  # a source (mute) or a reason (leave, stop)


@dataclass(slots=True)
class PlaybackView:
    recording_id: str
    room: str | None = None
    consultation_id: str | None = None
    patient_ref: str | None = None
    started_at: str | None = None
    stopped_at: str | None = None
    sealed: bool = False
    people: list[Person] = field(default_factory=list)
    tracks: list[TrackView] = field(default_factory=list)
    timeline: list[Moment] = field(default_factory=list)

    def name_of(self, participant_id: str | None) -> str:
        for person in self.people:
            if person.id == participant_id:
                return person.name
        return participant_id or ""


def _seconds(at: object, start: datetime | None) -> float | None:
    if not isinstance(at, str) or start is None:
        return None
    try:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round(max(0.0, (moment - start).total_seconds()), 3)


def playback_view(recording_id: str, entries: list[dict[str, Any]]) -> PlaybackView:
    """What the player page shows, from decrypted entries (``recording.storage``)."""
    view = PlaybackView(recording_id)
    start: datetime | None = None
    consent: dict[str, str] = {}
    people: dict[str, dict[str, Any]] = {}
    segments: dict[str, int] = {}
    for entry in entries:
        kind, data, at = entry.get("type"), entry.get("data") or {}, entry.get("at")
        if not isinstance(data, dict):
            continue
        when = _seconds(at, start)
        if kind == "recording_started" and start is None:
            view.started_at = at if isinstance(at, str) else None
            start = datetime.fromisoformat(str(at).replace("Z", "+00:00")) if at else None
            view.room = _text(data.get("room"))
            view.consultation_id = _text(data.get("consultation_id"))
            view.patient_ref = _text(data.get("patient_ref"))
            view.timeline.append(Moment(0.0, "recording_started"))
        elif kind == "participant":
            people[str(data.get("id"))] = data
        elif kind == "consent":
            who = str(data.get("participant_id"))
            consent[who] = "granted" if data.get("granted") else "declined"
            view.timeline.append(Moment(when or 0.0, f"consent_{consent[who]}", who))
        elif kind == "track_started":
            view.tracks.append(_track(data))
        elif kind == "segment":
            track_id = str(data.get("track_id"))
            segments[track_id] = segments.get(track_id, 0) + 1
        elif kind == "event" and data.get("kind") in TIMELINE_EVENTS:
            offset = data.get("offset_s")
            moment = float(offset) if isinstance(offset, int | float) else when or 0.0
            pid = data.get("participant_id")
            detail = _text(data.get("source") or data.get("reason")) or ""
            view.timeline.append(
                Moment(moment, str(data["kind"]), pid if isinstance(pid, str) else None, detail)
            )
        elif kind == "recording_stopped":
            view.stopped_at = at if isinstance(at, str) else None
            reason = _text(data.get("reason")) or ""
            view.timeline.append(Moment(when or 0.0, "recording_stopped", None, reason))
        elif kind == "sealed":
            view.sealed = True
    view.people = [
        Person(
            pid,
            _text(d.get("name")) or pid,
            _text(d.get("clinic")) or "",
            _text(d.get("tier")) or "",
            _text(d.get("role")) or "",
            consent.get(pid, "pending"),
        )
        for pid, d in people.items()
    ]
    view.tracks = [
        TrackView(
            t.track_id, t.participant_id, t.kind, t.source, t.offset_s, segments.get(t.track_id, 0)
        )
        for t in view.tracks
        if segments.get(t.track_id)
    ]
    view.timeline.sort(key=lambda m: m.offset_s)  # stable: same time keeps journal order
    return view


def _track(data: dict[str, Any]) -> TrackView:
    offset = data.get("offset_s")
    return TrackView(
        str(data.get("track_id")),
        str(data.get("participant_id")),
        str(data.get("kind")),
        str(data.get("source") or ""),
        float(offset) if isinstance(offset, int | float) else 0.0,
        0,
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------- track copies


def track_copy_path(directory: Path, track_id: str) -> Path:
    return directory / PLAYBACK_DIR / f"{validate_track_id(track_id)}.webm"


def build_track_copy(directory: Path, track_id: str, keyring: Keyring | None) -> Path:
    """Blocking: the playable copy of one track (made once, then reused); PlaybackError."""
    out = track_copy_path(directory, track_id)
    if out.is_file():
        return out
    infos = []
    for entry in read_entries(directory, keyring):
        if entry.get("type") == "segment" and entry["data"].get("track_id") == track_id:
            try:
                infos.append(SegmentInfo.from_dict(entry["data"]))
            except ValueError as exc:
                raise PlaybackError(f"{track_id}: malformed segment entry: {exc}") from None
    if not infos:
        raise PlaybackError(f"no recorded track {track_id}")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    output = MediaOutput(part, keyring)
    try:
        with av.open(output.target, "w", format="webm") as container:
            copied = _copy_segments(
                directory, sorted(infos, key=lambda i: i.index), container, keyring
            )
        if not copied:
            raise PlaybackError(f"{track_id}: no segment could be read")
        output.finish()
        os.replace(part, out)
    except BaseException:
        output.discard()
        part.unlink(missing_ok=True)
        raise
    return out


def _copy_segments(
    directory: Path,
    infos: list[SegmentInfo],
    container: av.container.OutputContainer,
    keyring: Keyring | None,
) -> int:
    """Mux every readable segment's packets into ``container``; the number of packets."""
    stream: Any = None
    copied = 0
    last_dts = -1
    for info in infos:
        try:
            plain = read_segment(directory, info, keyring)
        except (OSError, SegmentAltered) as exc:
            log.warning(
                "%s: segment %d left out of the playback copy: %s", directory.name, info.index, exc
            )
            continue
        with av.open(io.BytesIO(plain), "r") as source:
            if not source.streams:
                continue
            source_stream = source.streams[0]
            if stream is None:
                stream = container.add_stream_from_template(source_stream)
            for packet in source.demux(source_stream):
                if packet.size == 0 or packet.dts is None or packet.pts is None:
                    continue
                dts = (
                    int(packet.dts * packet.time_base / stream.time_base)
                    if stream.time_base
                    else packet.dts
                )
                if dts <= last_dts:
                    continue  # segments never overlap; be safe with the muxer's ordering rule
                last_dts = dts
                packet.stream = stream
                container.mux(packet)
                copied += 1
    return copied
