"""Recorder and Recordings on a real MediaRoom fed with real VP8/Opus packets (no sockets).

Forwarders read from :class:`PacketSource` (a queue standing in for a publisher's
remote track); signalling is driven through RoomRegistry with connections that
only collect the messages they are sent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import pytest
from aiortc import RTCConfiguration
from aiortc.mediastreams import MediaStreamError

from media_server.forwarder import Forwarder, TrackInfo
from media_server.packet import MediaPacket
from media_server.room import MediaRoom
from recording.cli import fhir_export
from recording.manifest import RecordingKeys, read_entries
from recording.recorder import ParticipantInfo, RecordingOptions
from recording.registry import NotRecording, RecordingActive, Recordings
from recording.verify import verify_recording
from signalling import cli
from signalling.auth import Claims, Grant, Tier
from signalling.rooms import RecordingRefused, RoomRegistry
from signalling.store import MemoryStore
from tests.unit.test_recording_segments import opus_packets, vp8_packets

ROOM = "room-1"


# ---------------------------------------------------------------- fakes


class PacketSource:
    """A publisher's remote track: the Forwarder awaits ``recv``; the test feeds packets."""

    kind = "video"

    def __init__(self) -> None:
        self._queue: asyncio.Queue[MediaPacket | None] = asyncio.Queue()

    def feed(self, packets: Iterable[MediaPacket]) -> None:
        for packet in packets:
            self._queue.put_nowait(packet)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def recv(self) -> MediaPacket:
        item = await self._queue.get()
        self._queue.task_done()
        if item is None:
            raise MediaStreamError
        return item

    async def drained(self) -> None:
        """Every packet fed so far went through the Forwarder."""
        await self._queue.join()
        await asyncio.sleep(0.05)


def publish(room: MediaRoom, pid: str, kind: str) -> PacketSource:
    """What PublisherConnection does for one offered track."""
    source = PacketSource()
    name = "camera" if kind == "video" else "microphone"
    info = TrackInfo(f"{pid}:{name}", pid, kind, name)
    forwarder = Forwarder(info, source, None, on_ended=room.track_unpublished)  # type: ignore[arg-type]
    forwarder.start()
    room.track_published(forwarder)
    return source


class Collector:
    """rooms.Connection that keeps what it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    async def kick(self, code: str, message: str, close_code: int) -> None:
        self.messages.append({"type": "kicked", "code": code})

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    def last(self, kind: str) -> dict[str, Any]:
        return next(m for m in reversed(self.messages) if m["type"] == kind)


class FakeSfu:
    """The Sfu surface RoomRegistry uses, with real MediaRooms (never negotiated)."""

    ice_urls: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.rooms: dict[str, MediaRoom] = {}

    def room(self, room_id: str) -> MediaRoom:
        return self.rooms.setdefault(room_id, MediaRoom(room_id, RTCConfiguration()))

    async def release_if_empty(self, room_id: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None and room.empty:
            del self.rooms[room_id]
            await room.close()


def claims(sub: str, *grants: Grant) -> Claims:
    return Claims(
        sub=sub,
        name=f"Участник {sub}",
        clinic="ЦРБ",
        tier=Tier.DISTRICT,
        room=ROOM,
        grants=frozenset({Grant.JOIN, Grant.PUBLISH, *grants}),
        exp=2**31,
        iat=0,
    )


def person(pid: str, role: str = "consultant") -> ParticipantInfo:
    return ParticipantInfo(pid, f"Участник {pid}", "ЦРБ", "district", role)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def video() -> list[MediaPacket]:
    return list(vp8_packets(3.0, keyframe_every=30))


@pytest.fixture(scope="module")
def audio() -> list[MediaPacket]:
    return opus_packets(3.0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> RecordingKeys:
    return RecordingKeys.load_or_create(tmp_path_factory.mktemp("data"))


@pytest.fixture
async def recordings(tmp_path: Path, keys: RecordingKeys) -> AsyncIterator[Recordings]:
    pool = ThreadPoolExecutor(max_workers=2)
    recs = Recordings(tmp_path, keys, executor=pool, segment_seconds=1.0)
    yield recs
    await recs.close()
    pool.shutdown()


def entries_of(recordings: Recordings, recording_id: str) -> list[dict[str, Any]]:
    return read_entries(recordings.directory(recording_id))


def of_type(entries: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["data"] for e in entries if e["type"] == kind]


def decoded_seconds(path: Path) -> tuple[int, float]:
    """(frames or samples decoded, end of the last frame in track seconds)."""
    count, end = 0, 0.0
    with av.open(str(path)) as container:
        stream = container.streams[0]
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            assert packet.pts is not None and packet.time_base is not None
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            for frame in packet.decode():
                count += getattr(frame, "samples", 1)
    return count, end


# ---------------------------------------------------------------- recorder


async def test_records_present_and_late_tracks_with_events_consent_and_seal(
    recordings: Recordings, video: list[MediaPacket], audio: list[MediaPacket]
) -> None:
    room = MediaRoom(ROOM, RTCConfiguration())
    a_video, a_audio = publish(room, "a", "video"), publish(room, "a", "audio")
    rec = await recordings.start(
        ROOM,
        room,
        [person("a", "chair"), person("b")],
        started_by="a",
        options=RecordingOptions(patient_ref="Patient/p-7"),
    )
    assert rec.capturing and rec.consent() == {"a": "pending", "b": "pending"}
    assert all(f.sink_count == 1 for f in room.forwarders.values())
    a_video.feed(video)
    a_audio.feed(audio)
    rec.set_consent("a", True)
    rec.set_consent("b", False)
    rec.muted("a", "microphone", True)

    await asyncio.sleep(0.3)
    rec.participant_joined(person("c"))
    c_audio = publish(room, "c", "audio")  # a late joiner's track: its own offset
    c_audio.feed(audio[:100])  # 2 s
    await c_audio.drained()
    c_audio.end()  # unpublished: track_ended before the stop
    rec.participant_left("c", "left")
    await a_video.drained()
    await a_audio.drained()

    _, result = await recordings.stop(ROOM)
    assert (result.reason, result.sealed, result.tracks) == ("stopped", True, 3)
    assert result.segments >= 6
    assert result.worker_cpu_s > 0 and result.loop_s > 0  # what the benchmark reports
    assert recordings.get(ROOM) is None
    assert all(f.sink_count == 0 for f in room.forwarders.values())

    entries = entries_of(recordings, rec.id)
    started = of_type(entries, "recording_started")[0]
    assert started["room"] == ROOM and started["consultation_id"] == ROOM
    assert started["patient_ref"] == "Patient/p-7" and started["started_by"] == "a"
    assert [p["id"] for p in of_type(entries, "participant")] == ["a", "b", "c"]
    assert of_type(entries, "participant")[0]["role"] == "chair"
    assert [(c["participant_id"], c["granted"]) for c in of_type(entries, "consent")] == [
        ("a", True),
        ("b", False),
    ]
    events = [(e["kind"], e.get("participant_id")) for e in of_type(entries, "event")]
    assert ("mute", "a") in events and ("join", "c") in events and ("leave", "c") in events
    assert ("consent_pending", None) in events
    pending = next(e for e in of_type(entries, "event") if e["kind"] == "consent_pending")
    assert pending["participant_ids"] == ["c"]
    tracks = {t["track_id"]: t for t in of_type(entries, "track_started")}
    assert set(tracks) == {"a.camera", "a.microphone", "c.microphone"}
    assert tracks["a.camera"]["codec"] == "vp8" and tracks["c.microphone"]["codec"] == "opus"
    assert tracks["a.camera"]["offset_s"] < 0.2
    assert 0.3 <= tracks["c.microphone"]["offset_s"] < 1.5
    ended = {t["track_id"]: t["stats"]["reason"] for t in of_type(entries, "track_ended")}
    assert ended == {
        "c.microphone": "unpublished",
        "a.camera": "recording_stopped",
        "a.microphone": "recording_stopped",
    }
    assert [e["type"] for e in entries[-2:]] == ["recording_stopped", "sealed"]

    report = verify_recording(recordings.directory(rec.id), recordings.keys.public_key())
    assert report.status == "intact", report.problems
    # every segment decodes; the tracks last as long as what was published
    ends: dict[str, float] = {}
    for seg in of_type(entries, "segment"):
        count, end = decoded_seconds(recordings.directory(rec.id) / seg["path"])
        assert count > 0
        ends[seg["track_id"]] = max(ends.get(seg["track_id"], 0.0), end)
    assert ends["a.camera"] == pytest.approx(3.0, abs=0.1)
    assert ends["a.microphone"] == pytest.approx(3.0, abs=0.05)
    assert ends["c.microphone"] == pytest.approx(2.0, abs=0.05)


async def test_republished_track_gets_a_new_name_and_one_start_per_room(
    recordings: Recordings, audio: list[MediaPacket]
) -> None:
    room = MediaRoom(ROOM, RTCConfiguration())
    first = publish(room, "a", "audio")
    rec = await recordings.start(ROOM, room, [person("a")], started_by="a")
    with pytest.raises(RecordingActive):
        await recordings.start(ROOM, room, [person("a")], started_by="a")
    first.feed(audio[:20])
    await first.drained()
    first.end()  # a reconnect: the same track id is published again
    await asyncio.sleep(0.05)
    second = publish(room, "a", "audio")
    second.feed(audio[:20])
    await second.drained()
    await recordings.stop(ROOM)
    with pytest.raises(NotRecording):
        await recordings.stop(ROOM)
    names = [t["track_id"] for t in of_type(entries_of(recordings, rec.id), "track_started")]
    assert names == ["a.microphone", "a.microphone.2"]
    assert verify_recording(rec.directory, recordings.keys.public_key()).status == "intact"


async def test_consent_required_waits_for_everyone_present(
    recordings: Recordings, audio: list[MediaPacket]
) -> None:
    room = MediaRoom(ROOM, RTCConfiguration())
    a, b = publish(room, "a", "audio"), publish(room, "b", "audio")
    rec = await recordings.start(
        ROOM,
        room,
        [person("a"), person("b")],
        started_by="a",
        options=RecordingOptions(consent_required=True),
    )
    assert not rec.capturing
    assert all(f.sink_count == 0 for f in room.forwarders.values())
    assert rec.set_consent("a", True) is False  # b has not answered: still nothing captured
    assert not rec.capturing
    assert rec.set_consent("b", True) is True
    assert rec.capturing and all(f.sink_count == 1 for f in room.forwarders.values())
    # a late joiner is recorded only once it consents
    rec.participant_joined(person("c"))
    c = publish(room, "c", "audio")
    assert room.forwarders["c:microphone"].sink_count == 0
    rec.set_consent("c", True)
    assert room.forwarders["c:microphone"].sink_count == 1
    # and no longer once it withdraws
    rec.set_consent("c", False)
    assert room.forwarders["c:microphone"].sink_count == 0
    for source in (a, b, c):
        source.feed(audio[:10])
    await asyncio.sleep(0.1)
    await recordings.stop(ROOM)
    entries = entries_of(recordings, rec.id)
    assert any(e["kind"] == "capture_started" for e in of_type(entries, "event"))
    assert verify_recording(rec.directory, recordings.keys.public_key()).status == "intact"


async def test_disk_full_stops_the_recording_and_tells_the_room(
    recordings: Recordings, video: list[MediaPacket]
) -> None:
    sfu = FakeSfu()
    rooms = RoomRegistry(MemoryStore(), sfu, "node-1", recordings)  # type: ignore[arg-type]
    conn = Collector()
    await rooms.join(claims("chair", Grant.RECORD), conn, lambda: None)
    cam = publish(sfu.rooms[ROOM], "chair", "video")
    rec = await rooms.start_recording(ROOM, started_by="chair")
    # the first segment file lands on a full device
    segment_dir = rec.directory / "tracks" / "chair.camera"
    segment_dir.mkdir(parents=True)
    os.symlink("/dev/full", segment_dir / "000000.webm.part")
    cam.feed(video)
    for _ in range(100):
        if "recording_stopped" in conn.types():
            break
        await asyncio.sleep(0.05)
    assert conn.last("recording_stopped") == {
        "type": "recording_stopped",
        "recording_id": rec.id,
        "reason": "disk_full",
    }
    assert recordings.get(ROOM) is None
    forwarder = sfu.rooms[ROOM].forwarders["chair:camera"]
    assert forwarder.sink_count == 0 and not forwarder.closed  # forwarding goes on
    entries = entries_of(recordings, rec.id)
    assert of_type(entries, "recording_stopped") == [{"reason": "disk_full"}]
    report = verify_recording(rec.directory, recordings.keys.public_key())
    assert report.status == "intact", report.problems  # what was recorded is sealed
    assert [p.code for p in report.problems] == ["partial_segment"]
    cam.end()


# ---------------------------------------------------------------- signalling


async def test_room_registry_tells_everyone_and_late_joiners(
    recordings: Recordings, audio: list[MediaPacket]
) -> None:
    store = MemoryStore()
    rooms = RoomRegistry(store, FakeSfu(), "node-1", recordings)  # type: ignore[arg-type]
    chair, other, late = Collector(), Collector(), Collector()
    p_chair = await rooms.join(claims("chair", Grant.RECORD, Grant.CHAIR), chair, lambda: None)
    p_other = await rooms.join(claims("other"), other, lambda: None)
    with pytest.raises(RecordingRefused) as refused:
        await rooms.stop_recording(ROOM, by="chair")
    assert refused.value.code == "not_recording"

    rec = await rooms.start_recording(ROOM, started_by="chair")
    for conn in (chair, other):
        started = conn.last("recording_started")
        assert started["recording_id"] == rec.id and started["started_by"] == "chair"
        assert started["capturing"] is True
    with pytest.raises(RecordingRefused) as refused:
        await rooms.start_recording(ROOM, started_by="chair")
    assert refused.value.code == "recording_active"

    await rooms.join(claims("late"), late, lambda: None)
    assert late.types()[:2] == ["joined", "recording_started"]
    assert late.messages[1]["consent"]["late"] == "pending"

    await rooms.recording_consent(p_other, True)
    assert chair.last("recording_status")["consent"]["other"] == "granted"
    await rooms.set_muted(p_chair, "camera", True)

    await rooms.leave(p_other, "left")
    _, result = await rooms.stop_recording(ROOM, by="chair")
    assert result.sealed
    for conn in (chair, late):
        assert conn.last("recording_stopped") == {
            "type": "recording_stopped",
            "recording_id": rec.id,
            "reason": "stopped",
        }
    audit = [(a.actor, a.action, a.outcome) for a in await store.list_audit()]
    assert ("chair", "recording_start", "ok") in audit
    assert ("other", "recording_consent", "granted") in audit
    assert ("chair", "recording_stop", "sealed") in audit
    events = of_type(entries_of(recordings, rec.id), "event")
    assert {(e["kind"], e.get("participant_id")) for e in events} >= {
        ("join", "late"),
        ("mute", "chair"),
        ("leave", "other"),
    }


async def test_last_one_out_stops_the_recording(recordings: Recordings) -> None:
    rooms = RoomRegistry(MemoryStore(), FakeSfu(), "node-1", recordings)  # type: ignore[arg-type]
    conn = Collector()
    p = await rooms.join(claims("chair", Grant.RECORD), conn, lambda: None)
    rec = await rooms.start_recording(ROOM, started_by="chair", consent_required=True)
    assert conn.last("recording_started")["consent_required"] is True
    await rooms.leave(p, "left")
    assert recordings.get(ROOM) is None
    entries = entries_of(recordings, rec.id)
    assert of_type(entries, "recording_stopped") == [{"reason": "room_empty"}]
    with pytest.raises(RecordingRefused) as refused:
        await rooms.start_recording(ROOM, started_by="chair")
    assert refused.value.code == "room_not_live"


# ---------------------------------------------------------------- command line


async def test_cli_verify_names_an_altered_segment_and_export_validates(
    recordings: Recordings,
    audio: list[MediaPacket],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fhir.resources.R4B.bundle import Bundle

    room = MediaRoom(ROOM, RTCConfiguration())
    mic = publish(room, "a", "audio")
    rec = await recordings.start(ROOM, room, [person("a", "chair")], started_by="a")
    mic.feed(audio)
    await mic.drained()
    await recordings.stop(ROOM)
    pem = tmp_path / "recording.pem"
    pem.write_text(recordings.keys.public_key_pem())
    data = ["--data-dir", str(tmp_path), "--public-key", str(pem)]

    bundle = Bundle.model_validate(
        fhir_export(rec.directory, base_url="https://k.example", recording_id=rec.id)
    )
    assert bundle.entry is not None
    assert bundle.entry[1].resource.class_fhir.code == "VR"  # type: ignore[union-attr]

    assert cli.main(["recordings", "verify", rec.id, *data]) == 0
    assert f"{rec.id}: intact" in capsys.readouterr().out
    segment = rec.directory / "tracks" / "a.microphone" / "000001.webm"
    raw = bytearray(segment.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    segment.write_bytes(bytes(raw))
    assert cli.main(["recordings", "verify", rec.id, *data]) == 2
    out = capsys.readouterr().out
    assert "altered" in out and "tracks/a.microphone/000001.webm" in out
    assert cli.main(["recordings", "export", rec.id, "--fhir", *data]) == 2
    assert cli.main(["recordings", "verify", "rec-nope", *data]) == 3
    assert cli.main(["recordings", "verify", rec.id, "--data-dir", str(tmp_path)]) == 3  # no key
    audit = (tmp_path / "audit" / "cli.jsonl").read_text()
    assert '"recording_verify"' in audit and '"refused_altered"' in audit
