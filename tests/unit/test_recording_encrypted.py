"""Recordings encrypted at rest: writing, verifying without the key, and every reader.

A real two-person recording (VP8 + Opus, TrackWriter and Manifest as the
Recorder uses them) is written with a key; then the readers — storage, verify,
composite render, FHIR export, retention, the CLI — are run on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import av
import pytest

from media_server.packet import MediaPacket
from recording import cli as recordings_cli
from recording.cipher import MAGIC
from recording.composite import RenderError, render_composite
from recording.keyring import DataKey, Keyring, KeyUnavailable, append_new_key
from recording.manifest import MANIFEST_NAME, Manifest, RecordingKeys
from recording.registry import recordings_root, summarize
from recording.retention import sweep
from recording.segments import TrackWriter
from recording.storage import media_size, open_media, read_entries, read_media
from recording.verify import verify_recording
from signalling import cli
from tests.media import solid_vp8, tone_opus, write_track

RECORDING_ID = "rec-enc-1"
SECONDS = 3.0
EBML = b"\x1a\x45\xdf\xa3"
NAMES = ("Иванова Анна", "Petrov Boris")
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> RecordingKeys:
    return RecordingKeys.load_or_create(tmp_path_factory.mktemp("signing"))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conf") / "recording.keys"
    append_new_key(path)
    return path


@pytest.fixture(scope="module")
def ring(key_file: Path) -> Keyring:
    return Keyring.load(key_file)


def make_recording(
    data_dir: Path, key: DataKey, keys: RecordingKeys, *, when: datetime | None = None
) -> Path:
    directory = recordings_root(data_dir) / RECORDING_ID
    directory.mkdir(parents=True)
    clock = (lambda: when) if when is not None else None
    with Manifest(directory, key=key, clock=clock) as manifest:
        manifest.recording_started(
            recording_id=RECORDING_ID,
            room="council-7",
            consultation_id="c-1",
            patient_ref="Patient/p-42",
        )
        for pid, name in zip(("anna", "boris"), NAMES, strict=True):
            manifest.participant(pid, name=name, clinic="ФАП Берёзовка", tier="lan", role="chair")
            manifest.event("join", {"offset_s": 0.0}, participant_id=pid)
        for pid, rgb, tone in (("anna", (220, 40, 40), 400), ("boris", (40, 200, 40), 600)):
            write_track(manifest, directory, pid, "audio", tone_opus(tone, 0.2, SECONDS), key=key)
            write_track(manifest, directory, pid, "video", solid_vp8(rgb, SECONDS), key=key)
        manifest.recording_stopped()
        manifest.seal(keys.private_key)
    return directory


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory, ring: Keyring, keys: RecordingKeys) -> Path:
    return make_recording(tmp_path_factory.mktemp("data"), ring.active, keys)


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "tracks").rglob("*") if p.is_file())


# ---------------------------------------------------------------- at rest


def test_nothing_on_disk_is_plaintext(recording: Path, ring: Keyring) -> None:
    files = segment_files(recording)
    assert len(files) >= 8 and all(p.suffix == ".webm" for p in files)
    for path in files:
        stored = path.read_bytes()
        assert stored.startswith(MAGIC) and EBML not in stored and b"webm" not in stored
    manifest = (recording / MANIFEST_NAME).read_text(encoding="utf-8")
    for secret in (*NAMES, "ФАП", "council-7", "Patient/p-42", "c-1"):
        assert secret not in manifest
    types = [json.loads(line)["type"] for line in manifest.splitlines()]
    assert types[0] == "recording_started" and types[-1] == "sealed"  # types stay readable


def test_readers_decrypt_transparently(recording: Path, ring: Keyring) -> None:
    entries = read_entries(recording, ring)
    people = [e["data"]["name"] for e in entries if e["type"] == "participant"]
    assert people == list(NAMES)
    assert entries[0]["data"]["patient_ref"] == "Patient/p-42"
    segment = next(e["data"] for e in entries if e["type"] == "segment")
    path = recording / segment["path"]
    plain = read_media(path, ring)
    assert plain.startswith(EBML) and media_size(path, ring) == len(plain)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == segment["sha256"]  # of what is stored
    with open_media(path, ring) as f, av.open(f, "r") as container:
        assert sum(1 for _ in container.decode(container.streams[0])) > 0
    summary = summarize(recording, ring)
    assert summary.encrypted and summary.room == "council-7" and summary.participants == 2


def test_missing_or_wrong_key_is_a_clear_error(recording: Path, ring: Keyring) -> None:
    with pytest.raises(KeyUnavailable, match="recording_key_file") as none:
        read_entries(recording, None)
    assert none.value.key_id == ring.active.id
    other = Keyring([DataKey(os.urandom(32))], source="other.keys")
    with pytest.raises(KeyUnavailable, match=ring.active.id):
        read_media(segment_files(recording)[0], other)
    locked = summarize(recording, None)
    assert locked.encrypted and locked.room is None and locked.sealed and locked.segments >= 8


def test_verify_needs_no_key_and_names_what_is_altered(
    recording: Path, keys: RecordingKeys, ring: Keyring, tmp_path: Path
) -> None:
    report = verify_recording(recording, keys.public_key())
    assert report.status == "intact", report.problems
    assert report.encryption_keys == [ring.active.id]
    copy = tmp_path / RECORDING_ID
    copy.mkdir()
    for path in recording.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(recording)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    victim = segment_files(copy)[2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    report = verify_recording(copy, keys.public_key())
    assert report.status == "altered"
    assert [p.path for p in report.problems] == [victim.relative_to(copy).as_posix()]
    lines = (copy / MANIFEST_NAME).read_bytes().splitlines(keepends=True)
    (copy / MANIFEST_NAME).write_bytes(b"".join(lines[:3] + lines[4:]))
    report = verify_recording(copy, keys.public_key())
    assert "entry missing: seq 3" in [p.message for p in report.problems]


def test_segment_in_progress_never_reaches_the_disk_in_the_clear(
    tmp_path: Path, ring: Keyring
) -> None:
    """A SIGKILL before a segment is sealed loses it; nothing readable is left behind."""
    video: Iterator[MediaPacket] = solid_vp8((10, 10, 200), 3.0)
    writer = TrackWriter(
        "cam", "video", tmp_path, 1000.0, 1000.0, segment_seconds=2.0, key=ring.active
    )
    for packet in video:
        writer.push(packet)  # 3 s: one sealed 2 s segment, one open in memory
    deadline = time.monotonic() + 10
    while not segment_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the worker muxes the rest of the packets meanwhile
    sealed = segment_files(tmp_path)
    assert [p.name for p in sealed] == ["000000.webm"]
    assert sealed[0].read_bytes().startswith(MAGIC)
    writer.close()
    assert [p.name for p in segment_files(tmp_path)] == ["000000.webm", "000001.webm"]


# ---------------------------------------------------------------- readers


def test_composite_is_rendered_from_and_to_encrypted_files(
    recording: Path, ring: Keyring, tmp_path: Path
) -> None:
    out = tmp_path / "composite.webm"
    result = render_composite(recording, out, width=320, height=180, fps=10, keyring=ring)
    assert not result.skipped_segments
    stored = out.read_bytes()
    assert stored.startswith(MAGIC) and EBML not in stored
    assert not list(tmp_path.glob("*.part"))
    with open_media(out, ring) as f, av.open(f, "r") as container:
        assert container.duration is not None
        assert abs(container.duration / 1e6 - SECONDS) < 0.5
        assert sum(1 for _ in container.decode(video=0)) == result.frames
    with pytest.raises(RenderError, match="recording_key_file"):
        render_composite(recording, tmp_path / "nokey.webm", width=320, height=180, fps=10)


def test_fhir_attachment_describes_the_decrypted_media(
    recording: Path, ring: Keyring, tmp_path: Path
) -> None:
    out = recording / "composite.webm"  # where render jobs put it: the playback page serves it
    render_composite(recording, out, width=320, height=180, fps=10, keyring=ring)
    bundle = recordings_cli.fhir_export(
        recording, base_url="https://k.example", recording_id=RECORDING_ID, media=out, keyring=ring
    )
    resources = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    attachment = resources["DocumentReference"]["content"][0]["attachment"]
    plain = read_media(out, ring)
    assert attachment["url"] == f"https://k.example/recordings/{RECORDING_ID}/media/composite"
    assert attachment["size"] == len(plain) != out.stat().st_size
    sha1 = hashlib.sha1(plain, usedforsecurity=False).digest()
    assert attachment["hash"] == base64.b64encode(sha1).decode()
    assert resources["DocumentReference"]["subject"]["reference"] == "Patient/p-42"
    names = [p["individual"]["display"] for p in resources["Encounter"]["participant"]]
    assert names == list(NAMES)


async def test_retention_reads_encrypted_manifests_and_keeps_what_it_cannot_read(
    tmp_path: Path, ring: Keyring, keys: RecordingKeys
) -> None:
    directory = make_recording(tmp_path, ring.active, keys, when=NOW - timedelta(days=400))
    report = await sweep(tmp_path, None, retention_days=30, now=NOW, dry_run=True)
    assert report.locked == [RECORDING_ID] and not report.deleted
    report = await sweep(tmp_path, None, retention_days=30, now=NOW, keyring=ring)
    assert [(d.id, d.room) for d in report.deleted] == [(RECORDING_ID, "council-7")]
    assert not directory.exists()


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["recordings", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify_without_key_export_with_it(
    tmp_path: Path,
    ring: Keyring,
    key_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("KONSILIUM_CONFIG", "KONSILIUM_REDIS_URL", "KONSILIUM_RECORDING_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    keys = RecordingKeys.load_or_create(tmp_path)
    make_recording(tmp_path, ring.active, keys)
    data = ("--data-dir", str(tmp_path))
    code, out, _ = run_cli(capsys, "verify", RECORDING_ID, *data)
    assert code == 0 and "intact" in out and ring.active.id in out
    code, _, err = run_cli(capsys, "export", RECORDING_ID, "--fhir", *data)
    assert code == 3 and ring.active.id in err and "recording_key_file" in err
    monkeypatch.setenv("KONSILIUM_RECORDING_KEY_FILE", str(key_file))
    code, out, err = run_cli(capsys, "export", RECORDING_ID, "--fhir", *data)
    assert code == 0, err
    bundle: dict[str, Any] = json.loads(out)
    assert NAMES[0] in json.dumps(bundle, ensure_ascii=False)
    code, out, _ = run_cli(capsys, "list", "--json", *data)
    assert code == 0 and json.loads(out)[0]["room"] == "council-7"

    rotated = tmp_path / "rotated.keys"
    rotated.write_bytes(key_file.read_bytes())
    rotated.chmod(0o600)
    code, out, _ = run_cli(capsys, "new-key", "--recording-key-file", str(rotated), *data)
    assert code == 0 and "added key" in out
    ring2 = Keyring.load(rotated)
    assert ring2.active.id != ring.active.id and ring.active.id in ring2.ids
    assert read_entries(tmp_path / "recordings" / RECORDING_ID, ring2)[0]["data"]["room"]
