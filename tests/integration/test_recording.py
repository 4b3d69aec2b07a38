"""Recording a real council: a real server process, aiortc bots, PyAV decoding the files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.encounter import Encounter

from media_server.bot import Bot
from media_server.clip import Clip
from recording.cipher import MAGIC
from recording.keyring import Keyring
from recording.manifest import MANIFEST_NAME, RecordingKeys, read_entries
from recording.storage import open_media
from recording.storage import read_entries as read_entries_decrypted
from recording.verify import verify_recording
from tests.services import KonsiliumServer

RECORD = ("join", "publish", "subscribe", "record")
ADMIN = {"Authorization": "Bearer test-admin-key"}
AUDIO_PACKET_S = 0.02


class RecBot(Bot):
    """A Bot that also keeps every server message, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.messages: list[dict[str, Any]] = []

    async def _handle(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        await super()._handle(msg)

    def got(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]


async def _bot(server: KonsiliumServer, clip: Clip, sub: str, grants: tuple[str, ...]) -> RecBot:
    bot = RecBot(server.url, "room-1", server.mint(sub, grants=grants), clip=clip)
    await bot.start()
    return bot


def _konsilium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("konsilium"))
    return subprocess.run(
        [exe, "recordings", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _recording_dir(server: KonsiliumServer) -> Path:
    found = [p for p in (server.data_dir / "recordings").iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def _track_end_s(directory: Path, segments: list[dict[str, Any]]) -> tuple[float, float, int]:
    """Decode every segment of a track: (first pts s, end of the last frame s, frames)."""
    first, end, frames = None, 0.0, 0
    for seg in sorted(segments, key=lambda s: s["index"]):
        with av.open(str(directory / seg["path"])) as container:
            stream = container.streams[0]
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                assert packet.pts is not None and packet.time_base is not None
                start = float(packet.pts * packet.time_base)
                first = start if first is None else min(first, start)
                end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
                frames += len(packet.decode())
    assert first is not None
    return first, end, frames


def _played_s(path: Path) -> tuple[float, float, int]:
    """Decode a composite: (end of its video, end of its audio, video frames decoded)."""
    video_end = audio_end = 0.0
    frames = 0
    with av.open(str(path)) as container:
        fps = float(container.streams.video[0].average_rate or 10)
        for frame in container.decode(video=0, audio=0):
            assert frame.time is not None
            if isinstance(frame, av.VideoFrame):
                frames += 1
                video_end = max(video_end, frame.time + 1 / fps)
            elif isinstance(frame, av.AudioFrame):
                audio_end = max(audio_end, frame.time + frame.samples / frame.sample_rate)
    return video_end, audio_end, frames


async def _sent(bots: list[RecBot]) -> dict[str, tuple[int, int]]:
    return {b.id: (b.sent("video"), b.sent("audio")) for b in bots}


async def test_council_recording_with_late_joiner_and_leaver(
    server: KonsiliumServer, clip: Clip, tmp_path: Path
) -> None:
    chair = await _bot(server, clip, "chair", RECORD)
    leaver = await _bot(server, clip, "leaver", ("join", "publish", "subscribe"))
    late: RecBot | None = None
    try:
        assert await chair.wait_until(lambda: chair.stats.frames_from("leaver") > 10, 10)
        # without the record grant: refused, and nothing is recorded
        await leaver.send({"type": "recording_start"})
        assert await leaver.wait_until(lambda: leaver.errors, 5)
        assert leaver.errors[-1]["code"] == "forbidden"
        assert leaver.errors[-1]["ref"] == "recording_start"

        await chair.send({"type": "recording_start", "patient_ref": "Patient/p-42"})
        assert await chair.wait_until(lambda: chair.got("recording_started"), 5)
        at_start = await _sent([chair, leaver])
        started_wall = time.monotonic()
        assert await leaver.wait_until(lambda: leaver.got("recording_started"), 5)
        rec = chair.got("recording_started")[0]
        assert rec["started_by"] == "chair" and rec["capturing"] is True
        assert set(rec["consent"]) == {"chair", "leaver"}
        await chair.send({"type": "consent", "granted": True})
        await leaver.send({"type": "consent", "granted": False})

        await asyncio.sleep(2.0)
        late = await _bot(server, clip, "late", ("join", "publish", "subscribe"))
        late_joined = time.monotonic() - started_wall
        kinds = [m["type"] for m in late.messages]
        assert kinds[:2] == ["joined", "recording_started"], kinds[:4]
        assert late.messages[1]["recording_id"] == rec["recording_id"]

        await asyncio.sleep(3.0)
        leaver_end = await _sent([leaver])
        await leaver.stop()
        await asyncio.sleep(3.0)

        at_stop = await _sent([chair, late])
        await chair.send({"type": "recording_stop"})
        assert await chair.wait_until(lambda: chair.got("recording_stopped"), 10)
        assert chair.got("recording_stopped")[0] == {
            "type": "recording_stopped",
            "recording_id": rec["recording_id"],
            "reason": "stopped",
        }
        assert await late.wait_until(lambda: late.got("recording_stopped"), 5)
    finally:
        for bot in (chair, leaver, late):
            if bot is not None:
                await bot.stop()

    directory = _recording_dir(server)
    assert directory.name == rec["recording_id"]
    entries = read_entries(directory)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_type.setdefault(entry["type"], []).append(entry["data"])
    assert [p["id"] for p in by_type["participant"]] == ["chair", "leaver", "late"]
    assert by_type["participant"][0]["clinic"] == "ЦРБ"
    consents = {c["participant_id"]: c["granted"] for c in by_type["consent"]}
    assert consents == {"chair": True, "leaver": False}
    pending = [e for e in by_type["event"] if e["kind"] == "consent_pending"]
    assert pending and pending[0]["participant_ids"] == ["late"]
    events = {(e["kind"], e.get("participant_id")) for e in by_type["event"]}
    assert {("join", "late"), ("leave", "leaver")} <= events

    # every track: decodes, starts on time, lasts as long as it was published (±0.5 s)
    tracks = {t["track_id"]: t for t in by_type["track_started"]}
    assert set(tracks) == {
        f"{p}.{s}" for p in ("chair", "leaver", "late") for s in ("camera", "microphone")
    }
    expected = {
        "chair": (
            at_stop["chair"][0] - at_start["chair"][0],
            at_stop["chair"][1] - at_start["chair"][1],
        ),
        "leaver": (
            leaver_end["leaver"][0] - at_start["leaver"][0],
            leaver_end["leaver"][1] - at_start["leaver"][1],
        ),
        "late": at_stop["late"],
    }
    for track_id, track in tracks.items():
        segments = [s for s in by_type["segment"] if s["track_id"] == track_id]
        assert segments, f"{track_id}: no segment"
        first, end, frames = _track_end_s(directory, segments)
        video_frames, audio_packets = expected[track["participant_id"]]
        if track["kind"] == "video":
            want = video_frames / clip.fps
            assert first < 1.0, f"{track_id}: first keyframe only at {first:.2f} s"
        else:
            want = audio_packets * AUDIO_PACKET_S
            assert first == 0.0
        assert frames > 0
        assert abs(end - want) <= 0.5, f"{track_id}: {end:.2f} s recorded, {want:.2f} s published"
    assert tracks["late.camera"]["offset_s"] == pytest.approx(late_joined, abs=1.0)
    assert tracks["chair.camera"]["offset_s"] < 0.5

    # the manifest is sealed with the server's key
    public_key = RecordingKeys.load_or_create(server.data_dir).public_key()
    report = verify_recording(directory, public_key)
    assert report.status == "intact", report.problems
    assert report.segments_checked == len(by_type["segment"])

    # the composite, rendered with the CLI: it plays, and lasts as long as the recording
    composite = tmp_path / "composite.webm"
    done = _konsilium(
        "render", directory.name, "--out", str(composite), "--size", "320x180", "--fps", "10",
        "--quiet", "--data-dir", str(server.data_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    times = {e["type"]: datetime.fromisoformat(e["at"]) for e in entries if e["type"] != "event"}
    recorded = (times["recording_stopped"] - times["recording_started"]).total_seconds()
    video_end, audio_end, frames = _played_s(composite)
    assert frames >= 10 * (recorded - 0.5), (frames, recorded)
    assert abs(video_end - recorded) <= 0.5, f"video {video_end:.2f} s, recorded {recorded:.2f} s"
    assert abs(audio_end - recorded) <= 0.5, f"audio {audio_end:.2f} s, recorded {recorded:.2f} s"

    # REST: listed, verified (and the public key is published)
    async with aiohttp.ClientSession(headers=ADMIN) as http:
        async with http.get(f"{server.url}/api/recordings") as resp:
            assert resp.status == 200
            listed = (await resp.json())["recordings"]
        async with http.get(f"{server.url}/api/recordings/{directory.name}/verify") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "intact"
        async with http.get(f"{server.url}/api/recordings/public-key") as resp:
            assert "BEGIN PUBLIC KEY" in await resp.text()
    assert [r["id"] for r in listed] == [directory.name] and listed[0]["sealed"] is True

    # the CLI: intact, FHIR export
    data = ("--data-dir", str(server.data_dir))
    done = _konsilium("verify", directory.name, *data)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "intact" in done.stdout
    out = tmp_path / "bundle.json"
    done = _konsilium("export", directory.name, "--fhir", "--out", str(out), *data)
    assert done.returncode == 0, done.stderr
    bundle = Bundle.model_validate(json.loads(out.read_text()))
    assert bundle.entry is not None
    resources = {e.resource.get_resource_type(): e.resource for e in bundle.entry}  # type: ignore[union-attr]
    encounter = resources["Encounter"]
    assert isinstance(encounter, Encounter) and encounter.class_fhir.code == "VR"
    doc = resources["DocumentReference"].model_dump(mode="json")  # type: ignore[attr-defined]
    assert doc["subject"]["reference"] == "Patient/p-42"
    assert doc["content"][0]["attachment"]["url"].endswith(f"/api/recordings/{directory.name}")

    # tampering: one flipped byte in one segment, then one deleted manifest line
    copy = server.data_dir / "recordings" / "rec-copy"
    shutil.copytree(directory, copy)
    segment = by_type["segment"][1]
    raw = bytearray((copy / segment["path"]).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / segment["path"]).write_bytes(bytes(raw))
    done = _konsilium("verify", "rec-copy", *data)
    assert done.returncode == 2, done.stdout
    assert "altered" in done.stdout and segment["path"] in done.stdout

    shutil.rmtree(copy)
    shutil.copytree(directory, copy)
    lines = (copy / MANIFEST_NAME).read_bytes().splitlines(keepends=True)
    deleted = 5
    (copy / MANIFEST_NAME).write_bytes(b"".join(lines[:deleted] + lines[deleted + 1 :]))
    done = _konsilium("verify", "rec-copy", *data)
    assert done.returncode == 2, done.stdout
    assert f"entry missing: seq {deleted}" in done.stdout


async def test_sigkill_mid_recording_leaves_playable_segments_and_an_incomplete_manifest(
    server: KonsiliumServer, clip: Clip
) -> None:
    a = await _bot(server, clip, "a", RECORD)
    b = await _bot(server, clip, "b", ("join", "publish", "subscribe"))
    try:
        assert await a.wait_until(lambda: a.stats.frames_from("b") > 10, 10)
        await a.send({"type": "recording_start"})
        assert await a.wait_until(lambda: a.got("recording_started"), 5)
        await asyncio.sleep(6.0)  # past the first 4 s segment of every track
        os.kill(server.pid, signal.SIGKILL)
    finally:
        await a.kill()
        await b.kill()
    directory = _recording_dir(server)
    entries = read_entries(directory)
    segments = [e["data"] for e in entries if e["type"] == "segment"]
    assert {s["track_id"] for s in segments} == {
        "a.camera",
        "a.microphone",
        "b.camera",
        "b.microphone",
    }
    for track_id in {s["track_id"] for s in segments}:
        _, end, frames = _track_end_s(directory, [s for s in segments if s["track_id"] == track_id])
        assert frames > 0 and end >= 3.0, (track_id, end)
    done = _konsilium("verify", directory.name, "--data-dir", str(server.data_dir))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "incomplete" in done.stdout and "not_sealed" in done.stdout
    assert "altered" not in done.stdout


async def test_rest_start_with_consent_required_stop_and_refusals(
    server: KonsiliumServer, clip: Clip
) -> None:
    api = f"{server.url}/api"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/recordings") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthorized"
        http.headers.update(ADMIN)
        async with http.post(f"{api}/rooms/room-1/recording") as resp:
            assert resp.status == 409
            assert (await resp.json())["error"]["code"] == "room_not_live"
        async with http.get(f"{api}/recordings/rec-nope/verify") as resp:
            assert resp.status == 404

        viewer = RecBot(
            server.url, "room-1", server.mint("viewer", grants=("join", "subscribe")), clip=clip
        )
        await viewer.start()
        try:
            body = {"consultation_id": "cons-1", "consent_required": True, "x": 1}
            async with http.post(f"{api}/rooms/room-1/recording", json=body) as resp:
                assert resp.status == 400
            del body["x"]
            async with http.post(f"{api}/rooms/room-1/recording", json=body) as resp:
                assert resp.status == 201, await resp.text()
                started = await resp.json()
            assert started["consent_required"] is True and started["capturing"] is False
            assert await viewer.wait_until(lambda: viewer.got("recording_started"), 5)
            assert viewer.got("recording_started")[0]["started_by"] == "admin-api"
            async with http.post(f"{api}/rooms/room-1/recording") as resp:
                assert resp.status == 409
                assert (await resp.json())["error"]["code"] == "recording_active"

            await viewer.send({"type": "consent", "granted": True})
            assert await viewer.wait_until(lambda: viewer.got("recording_status"), 5)
            status = viewer.got("recording_status")[-1]
            assert status["capturing"] is True and status["consent"] == {"viewer": "granted"}

            async with http.delete(f"{api}/rooms/room-1/recording") as resp:
                assert resp.status == 200
                stopped = await resp.json()
            assert stopped["sealed"] is True and stopped["reason"] == "stopped"
            assert await viewer.wait_until(lambda: viewer.got("recording_stopped"), 5)
            async with http.delete(f"{api}/rooms/room-1/recording") as resp:
                assert resp.status == 409
                assert (await resp.json())["error"]["code"] == "not_recording"
            await viewer.send({"type": "consent", "granted": True})
            assert await viewer.wait_until(lambda: viewer.errors, 5)
            assert viewer.errors[-1]["code"] == "not_recording"
        finally:
            await viewer.stop()

        async with http.get(f"{api}/recordings/{started['recording_id']}") as resp:
            summary = await resp.json()
        assert summary["consultation_id"] == "cons-1" and summary["sealed"] is True
        assert summary["participants"] == 1 and summary["active"] is False


async def _poll_render(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        async with http.get(url) as resp:
            job: dict[str, Any] = await resp.json()
        if job["status"] != "running":
            return job
        await asyncio.sleep(0.2)
    raise AssertionError("render still running")


async def test_encrypted_recording_verifies_without_the_key_and_reads_with_it(
    tmp_path: Path, clip: Clip
) -> None:
    key_file = tmp_path / "recording.keys"
    made = _konsilium("new-key", "--recording-key-file", str(key_file), "--data-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    keyring = Keyring.load(key_file)
    extra = ("--recording-key-file", str(key_file))
    with KonsiliumServer(tmp_path / "data", extra_args=extra) as server:
        chair = await _bot(server, clip, "chair", RECORD)
        other = await _bot(server, clip, "other", ("join", "publish", "subscribe"))
        try:
            assert await chair.wait_until(lambda: chair.stats.frames_from("other") > 10, 10)
            await chair.send({"type": "recording_start", "patient_ref": "Patient/p-42"})
            assert await chair.wait_until(lambda: chair.got("recording_started"), 5)
            await asyncio.sleep(5.0)
            await chair.send({"type": "recording_stop"})
            assert await chair.wait_until(lambda: chair.got("recording_stopped"), 10)
        finally:
            await chair.stop()
            await other.stop()
        directory = _recording_dir(server)

        # on disk: ciphertext only, no EBML/WebM, no names, clinics or patient
        files = [p for p in (directory / "tracks").rglob("*") if p.is_file()]
        assert len(files) >= 4 and not [p for p in files if p.name.endswith(".part")]
        for path in files:
            stored = path.read_bytes()
            assert stored.startswith(MAGIC), path
            assert b"\x1a\x45\xdf\xa3" not in stored and b"webm" not in stored, path
        journal = (directory / MANIFEST_NAME).read_text(encoding="utf-8")
        for secret in ("Участник chair", "Участник other", "ЦРБ", "Patient/p-42", "room-1"):
            assert secret not in journal

        # verify needs no key (this environment has none configured): intact, key named
        done = _konsilium("verify", directory.name, "--data-dir", str(server.data_dir))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "intact" in done.stdout and keyring.active.id in done.stdout

        # every track decodes through the decrypting reader
        entries = read_entries_decrypted(directory, keyring)
        names = [e["data"]["name"] for e in entries if e["type"] == "participant"]
        assert names == ["Участник chair", "Участник other"]
        segments = [e["data"] for e in entries if e["type"] == "segment"]
        for track_id in {s["track_id"] for s in segments}:
            frames = 0
            for seg in (s for s in segments if s["track_id"] == track_id):
                with (
                    open_media(directory / seg["path"], keyring) as f,
                    av.open(f, "r") as container,
                ):
                    frames += sum(1 for _ in container.decode(container.streams[0]))
            assert frames > 0, track_id

        # the composite, rendered by the server: encrypted on disk, plays through the reader
        url = f"{server.url}/api/recordings/{directory.name}/render"
        async with aiohttp.ClientSession(headers=ADMIN) as http:
            async with http.post(url, json={"width": 320, "height": 180, "fps": 10}) as resp:
                assert resp.status == 202, await resp.text()
            job = await _poll_render(http, url)
        assert job["status"] == "done", job
        composite = directory / "composite.webm"
        assert composite.read_bytes().startswith(MAGIC)
        with open_media(composite, keyring) as f, av.open(f, "r") as container:
            assert container.duration is not None
            assert abs(container.duration / 1e6 - job["duration_s"]) < 0.5
            assert job["size"] == f.seek(0, os.SEEK_END)

        # export needs the key: the CLI reads it from the flag (or the setting)
        out = tmp_path / "bundle.json"
        data = ("--data-dir", str(server.data_dir))
        done = _konsilium("export", directory.name, "--fhir", "--out", str(out), *data)
        assert done.returncode == 3 and keyring.active.id in done.stderr
        done = _konsilium("export", directory.name, "--fhir", "--out", str(out), *data, *extra)
        assert done.returncode == 0, done.stderr
        bundle = Bundle.model_validate(json.loads(out.read_text()))
        assert "Участник chair" in out.read_text() and bundle.entry


async def test_room_settings_auto_record_with_consent_and_the_patient_of_the_room(
    server: KonsiliumServer, clip: Clip, tmp_path: Path
) -> None:
    """An integrating system configures a room before the council: it is recorded from
    the first join, asks for consent, and its records name the room's patient."""
    room_api = f"{server.url}/api/rooms/room-1"
    settings = {
        "auto_record": True,
        "consent_required": True,
        "patient_ref": "Patient/42",
        "consultation_id": "cons-7",
        "retention_days": 30,
    }
    async with aiohttp.ClientSession() as http:
        async with http.put(room_api, json={"settings": settings}) as resp:
            assert resp.status == 401
        http.headers.update(ADMIN)
        bad = {"settings": {"auto_record": "yes"}}
        async with http.put(room_api, json=bad) as resp:
            assert resp.status == 400
            assert "auto_record" in (await resp.json())["error"]["message"]
        async with http.put(room_api, json={"settings": {"retention": 3}}) as resp:
            assert resp.status == 400
            assert "retention" in (await resp.json())["error"]["message"]
        async with http.put(room_api, json={"title": "Консилиум", "settings": settings}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.put(room_api, json={"title": "Консилиум", "settings": settings}) as resp:
            assert resp.status == 200  # reconfigured, not created
        async with http.get(room_api) as resp:
            room = await resp.json()
            assert room["title"] == "Консилиум" and room["settings"] == settings

        chair = await _bot(server, clip, "chair", RECORD)
        try:
            # recorded from the first join, asking everyone for consent
            for _ in range(50):
                if chair.got("recording_started"):
                    break
                await asyncio.sleep(0.1)
            started = chair.got("recording_started")
            assert started, "the room was not recorded automatically"
            assert started[0]["consent_required"] is True
            await chair.send({"type": "consent", "granted": True})
            await asyncio.sleep(2)
            async with http.delete(f"{room_api}/recording") as resp:
                assert resp.status == 200, await resp.text()
        finally:
            await chair.stop()

    directory = _recording_dir(server)
    out = tmp_path / "export.json"
    done = _konsilium(
        "export", directory.name, "--fhir", "--out", str(out), "--data-dir", str(server.data_dir)
    )
    assert done.returncode == 0, done.stderr
    bundle = json.loads(out.read_text())
    resources = [e["resource"] for e in bundle["entry"]]
    doc = next(r for r in resources if r["resourceType"] == "DocumentReference")
    assert doc["subject"] == {"reference": "Patient/42"}
    encounter = next(r for r in resources if r["resourceType"] == "Encounter")
    assert "cons-7" in json.dumps(encounter["identifier"])  # the room's consultation
