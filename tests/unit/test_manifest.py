"""Manifest hash chain, seal and verify_recording on a real recorded session."""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from media_server.packet import MediaPacket
from recording.manifest import (
    GENESIS_HASH,
    MANIFEST_NAME,
    Manifest,
    ManifestSealedError,
    RecordingKeyError,
    RecordingKeys,
    entry_hash,
    read_entries,
)
from recording.segments import SegmentInfo, TrackWriter, segment_relpath
from recording.verify import VerifyReport, verify_recording
from tests.unit.test_recording_segments import opus_packets, vp8_packets

SESSION_START = 1_700_000_000.0


@pytest.fixture(scope="module")
def media() -> tuple[list[MediaPacket], list[MediaPacket]]:
    return list(vp8_packets(4.0, keyframe_every=30)), opus_packets(3.0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> RecordingKeys:
    return RecordingKeys.load_or_create(tmp_path_factory.mktemp("data"))


@dataclass
class Recording:
    directory: Path
    segments: list[SegmentInfo]


def record(
    directory: Path,
    media: tuple[list[MediaPacket], list[MediaPacket]],
    keys: RecordingKeys | None,
) -> Recording:
    """A council of two: the chair's camera from the start, a feldsher's mic 2 s late."""
    video, audio = media
    segments: list[SegmentInfo] = []

    def on_segment(info: SegmentInfo) -> None:
        segments.append(info)
        manifest.segment(info)

    manifest = Manifest(directory)
    manifest.recording_started(
        recording_id="rec-1",
        room="room-7",
        consultation_id="cons-42",
        patient_ref="Patient/p-1",
        settings={"segment_seconds": 1.0},
    )
    manifest.participant("u-chair", name="Dr A", clinic="Regional", tier="lan", role="chair")
    manifest.participant("u-fel", name="F B", clinic="Village", tier="satellite", role="feldsher")
    manifest.consent("u-chair", granted=True)
    manifest.consent("u-fel", granted=True)
    cam = TrackWriter(
        "cam-chair", "video", directory, SESSION_START, SESSION_START,
        segment_seconds=1.0, on_segment=on_segment,
    )  # fmt: skip
    mic = TrackWriter(
        "mic-fel", "audio", directory, SESSION_START, SESSION_START + 2.0,
        segment_seconds=1.0, on_segment=on_segment,
    )  # fmt: skip
    for writer, participant in ((cam, "u-chair"), (mic, "u-fel")):
        assert writer.offset_s is not None
        manifest.track_started(
            writer.track_id,
            participant_id=participant,
            kind=writer.kind,
            source="camera" if writer.kind == "video" else "microphone",
            codec=writer.codec,
            offset_s=writer.offset_s,
        )
    manifest.event("join", participant_id="u-fel")
    for packet in video:
        cam.push(packet)
    for packet in audio:
        mic.push(packet)
    for writer in (cam, mic):
        writer.close()
        manifest.track_ended(writer.track_id, stats={"dropped": writer.stats.dropped_queue_full})
    manifest.event("conclusion", {"text_sha256": "ab" * 32}, participant_id="u-chair")
    manifest.recording_stopped()
    if keys is not None:
        manifest.seal(keys.private_key)
    manifest.close()
    manifest.close()
    return Recording(directory, segments)


def codes(report: VerifyReport) -> list[str]:
    return [p.code for p in report.problems]


def manifest_lines(directory: Path) -> list[bytes]:
    return (directory / MANIFEST_NAME).read_bytes().splitlines(keepends=True)


# ---------------------------------------------------------------- intact


def test_sealed_recording_verifies_intact(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    rec = record(tmp_path, media, keys)
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "intact", report.problems
    assert report.problems == []
    assert report.sealed and report.signed_by == keys.fingerprint()
    assert report.segments_checked == len(rec.segments) == 4 + 3
    entries = read_entries(tmp_path)
    assert report.intact_through == entries[-1]["seq"] == len(entries) - 1
    assert entries[0]["prev"] == GENESIS_HASH
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert entries[0]["at"].endswith("Z")
    started = {e["data"]["track_id"]: e["data"] for e in entries if e["type"] == "track_started"}
    assert started["mic-fel"]["offset_s"] == pytest.approx(2.0)
    assert started["cam-chair"]["offset_s"] == 0.0
    # the public key as PEM works too
    assert verify_recording(tmp_path, keys.public_key_pem()).status == "intact"


# ---------------------------------------------------------------- altered


def test_flipped_byte_in_a_segment_is_altered_and_named(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    record(tmp_path, media, keys)
    victim = tmp_path / segment_relpath("cam-chair", 2)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "altered"
    assert codes(report) == ["segment_sha256_mismatch"]
    problem = report.problems[0]
    assert (problem.track_id, problem.segment_index) == ("cam-chair", 2)
    assert problem.path == "tracks/cam-chair/000002.webm"
    assert "cam-chair" in problem.message and "segment 2" in problem.message


def test_deleted_middle_line_is_altered_naming_the_missing_seq(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    record(tmp_path, media, keys)
    lines = manifest_lines(tmp_path)
    del lines[5]
    (tmp_path / MANIFEST_NAME).write_bytes(b"".join(lines))
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "altered"
    missing = [p for p in report.problems if p.code == "entry_missing"]
    assert len(missing) == 1 and missing[0].seq == 5
    assert "seq 5" in missing[0].message
    assert "chain_broken" in codes(report)  # entry 6 no longer links to entry 4
    assert report.intact_through == 4


def test_edited_entry_is_a_hash_mismatch(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    record(tmp_path, media, keys)
    lines = manifest_lines(tmp_path)
    entry = json.loads(lines[3])
    assert entry["type"] == "consent"
    entry["data"]["granted"] = False
    lines[3] = json.dumps(entry).encode() + b"\n"
    (tmp_path / MANIFEST_NAME).write_bytes(b"".join(lines))
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "altered"
    assert codes(report) == ["hash_mismatch"]
    assert report.problems[0].message == "entry 3 hash mismatch"


def test_rehashed_chain_fails_the_signature(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    """Rewriting an entry and recomputing every later hash still breaks the seal."""
    record(tmp_path, media, keys)
    entries = read_entries(tmp_path)
    entries[1]["data"]["name"] = "Someone Else"
    prev = entries[0]["hash"]
    for entry in entries[1:]:
        entry["prev"] = prev
        if entry["type"] == "sealed":
            entry["data"]["signed_hash"] = prev
        entry["hash"] = entry_hash(entry)
        prev = entry["hash"]
    (tmp_path / MANIFEST_NAME).write_text("".join(json.dumps(e) + "\n" for e in entries))
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "altered"
    assert codes(report) == ["signature_invalid"]


def test_other_key_and_missing_segment_are_altered(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    record(tmp_path, media, keys)
    other = Ed25519PrivateKey.generate().public_key()
    report = verify_recording(tmp_path, other)
    assert report.status == "altered" and codes(report) == ["signature_invalid"]
    (tmp_path / segment_relpath("mic-fel", 1)).unlink()
    report = verify_recording(tmp_path, keys.public_key())
    assert codes(report) == ["segment_missing"]
    assert report.problems[0].track_id == "mic-fel"


def test_unlisted_segment_in_a_sealed_recording_is_altered(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    record(tmp_path, media, keys)
    extra = tmp_path / segment_relpath("cam-chair", 9)
    extra.write_bytes((tmp_path / segment_relpath("cam-chair", 0)).read_bytes())
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "altered"
    assert codes(report) == ["unlisted_segment"]
    assert report.problems[0].path == "tracks/cam-chair/000009.webm"


# ---------------------------------------------------------------- crash


def test_torn_last_line_without_seal_is_incomplete_but_intact_so_far(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    record(tmp_path, media, keys=None)
    lines = manifest_lines(tmp_path)
    last_full = len(lines) - 2
    lines[-1] = lines[-1][: len(lines[-1]) // 2]  # crash in the middle of the last write
    (tmp_path / MANIFEST_NAME).write_bytes(b"".join(lines))
    # the track that was being written at crash time
    (tmp_path / "tracks" / "mic-fel" / "000003.webm.part").write_bytes(b"\x1a\x45\xdf\xa3")
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "incomplete", report.problems
    assert report.intact_through == last_full
    assert not report.sealed
    assert sorted(codes(report)) == ["not_sealed", "partial_segment", "torn_last_line"]
    torn = next(p for p in report.problems if p.code == "torn_last_line")
    assert f"entries 0–{last_full} verify" in torn.message
    assert {p.severity for p in report.problems} == {"incomplete", "note"}


def test_reopening_after_a_crash_cuts_the_torn_line_and_continues(
    tmp_path: Path, media: tuple[list[MediaPacket], list[MediaPacket]], keys: RecordingKeys
) -> None:
    record(tmp_path, media, keys=None)
    with open(tmp_path / MANIFEST_NAME, "ab") as f:
        f.write(b'{"at":"2025-')
    with Manifest(tmp_path) as manifest:
        recovered = read_entries(tmp_path)[-1]
        assert recovered["type"] == "event" and recovered["data"]["kind"] == "recovered"
        assert recovered["data"]["torn_bytes"] == 12
        manifest.seal(keys.private_key)
        with pytest.raises(ManifestSealedError):
            manifest.event("chat", {"text": "late"})
    report = verify_recording(tmp_path, keys.public_key())
    assert report.status == "intact", report.problems


def test_concurrent_appends_keep_one_chain(tmp_path: Path, keys: RecordingKeys) -> None:
    fixed = datetime(2025, 9, 1, 10, 0, tzinfo=UTC)
    with Manifest(tmp_path, clock=lambda: fixed) as manifest:
        manifest.recording_started(recording_id="r", room="x", consultation_id="c")

        def writer(n: int) -> None:
            for i in range(25):
                manifest.event("chat", {"from": n, "i": i})

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        manifest.seal(keys.private_key)
    entries = read_entries(tmp_path)
    assert [e["seq"] for e in entries] == list(range(102))
    assert entries[1]["at"] == "2025-09-01T10:00:00.000Z"
    assert verify_recording(tmp_path, keys.public_key()).status == "intact"


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with Manifest(tmp_path) as manifest:
        with pytest.raises(ValueError):
            manifest.append("made_up", {})
        with pytest.raises(ValueError):
            manifest.event("Not A Word")


# ---------------------------------------------------------------- keys


def test_recording_keys_are_created_0600_and_reloaded(tmp_path: Path) -> None:
    first = RecordingKeys.load_or_create(tmp_path)
    assert first.path == tmp_path / "keys" / "recording_ed25519.pem"
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    again = RecordingKeys.load_or_create(tmp_path)
    assert again.public_key_pem() == first.public_key_pem()
    assert again.public_key_pem().startswith("-----BEGIN PUBLIC KEY-----")
    assert first.fingerprint().startswith("sha256:")
    os.chmod(first.path, 0o644)
    with pytest.raises(RecordingKeyError):
        RecordingKeys.load_or_create(tmp_path)
