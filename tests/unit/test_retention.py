"""Retention: expired sealed recordings are deleted with an audit entry, nothing else is."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from recording import cli as recordings_cli
from recording.manifest import Manifest, RecordingKeys
from recording.registry import recordings_root
from recording.retention import EXPIRED_ACTION, RetentionSweeper, sweep
from signalling.settings import Settings, SettingsError, load_settings
from signalling.store import MemoryStore, RoomRecord

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> RecordingKeys:
    return RecordingKeys.load_or_create(tmp_path_factory.mktemp("keys"))


def make_recording(
    data_dir: Path,
    recording_id: str,
    *,
    room: str,
    stopped_days_ago: float,
    keys: RecordingKeys,
    sealed: bool = True,
    stopped: bool = True,
) -> Path:
    """A small real manifest whose entries are stamped ``stopped_days_ago`` before NOW."""
    moment = NOW - timedelta(days=stopped_days_ago)
    directory = recordings_root(data_dir) / recording_id
    manifest = Manifest(directory, clock=lambda: moment)
    try:
        manifest.recording_started(recording_id=recording_id, room=room, consultation_id="c-1")
        manifest.participant("p1", name="Dr. Example", clinic="Clinic", tier="host", role="chair")
        if stopped:
            manifest.recording_stopped(reason="stopped")
        if sealed:
            manifest.seal(keys.private_key)
    finally:
        manifest.close()
    return directory


async def test_expired_sealed_recording_is_deleted_with_an_audit_entry(
    tmp_path: Path, keys: RecordingKeys
) -> None:
    old = make_recording(tmp_path, "rec-old", room="r1", stopped_days_ago=31, keys=keys)
    young = make_recording(tmp_path, "rec-young", room="r1", stopped_days_ago=29, keys=keys)
    store = MemoryStore()
    report = await sweep(tmp_path, store, retention_days=30, now=NOW)
    assert not old.exists()
    assert young.exists()
    assert [d.id for d in report.deleted] == ["rec-old"]
    assert report.kept == ["rec-young"]
    events = await store.list_audit(action=EXPIRED_ACTION)
    assert len(events) == 1
    event = events[0]
    assert (event.actor, event.target, event.outcome) == ("system", "rec-old", "deleted")
    assert event.detail["room"] == "r1"
    assert event.detail["retention_days"] == 30
    assert isinstance(event.detail["stopped_at"], str)
    assert "Dr. Example" not in json.dumps(event.detail)


async def test_in_progress_and_unsealed_recordings_are_kept_and_reported(
    tmp_path: Path, keys: RecordingKeys
) -> None:
    running = make_recording(
        tmp_path,
        "rec-running",
        room="r1",
        stopped_days_ago=400,
        keys=keys,
        stopped=False,
        sealed=False,
    )
    crashed = make_recording(
        tmp_path, "rec-crashed", room="r1", stopped_days_ago=400, keys=keys, sealed=False
    )
    active = make_recording(tmp_path, "rec-active", room="r1", stopped_days_ago=400, keys=keys)
    store = MemoryStore()
    report = await sweep(
        tmp_path, store, retention_days=1, now=NOW, is_active=lambda rid: rid == "rec-active"
    )
    assert running.exists() and crashed.exists() and active.exists()
    assert sorted(report.incomplete) == ["rec-active", "rec-crashed", "rec-running"]
    assert report.deleted == []
    assert await store.list_audit() == []


async def test_per_room_override_is_respected(tmp_path: Path, keys: RecordingKeys) -> None:
    short = make_recording(tmp_path, "rec-short", room="short", stopped_days_ago=10, keys=keys)
    keep = make_recording(tmp_path, "rec-keep", room="forever", stopped_days_ago=10000, keys=keys)
    other = make_recording(tmp_path, "rec-other", room="plain", stopped_days_ago=10, keys=keys)
    store = MemoryStore()
    await store.create_room(RoomRecord("short", "S", 0.0, {"retention_days": 7}))
    await store.create_room(RoomRecord("forever", "F", 0.0, {"retention_days": 0}))
    await store.create_room(RoomRecord("plain", "P", 0.0, {"retention_days": "bad"}))
    report = await sweep(tmp_path, store, retention_days=365, now=NOW)
    assert not short.exists()
    assert keep.exists() and other.exists()
    assert [(d.id, d.retention_days) for d in report.deleted] == [("rec-short", 7)]


async def test_retention_zero_keeps_everything(tmp_path: Path, keys: RecordingKeys) -> None:
    old = make_recording(tmp_path, "rec-ancient", room="r1", stopped_days_ago=20000, keys=keys)
    store = MemoryStore()
    report = await sweep(tmp_path, store, retention_days=0, now=NOW)
    assert old.exists()
    assert report.deleted == [] and report.kept == ["rec-ancient"]
    assert await store.list_audit() == []


async def test_dry_run_deletes_nothing(tmp_path: Path, keys: RecordingKeys) -> None:
    old = make_recording(tmp_path, "rec-old", room="r1", stopped_days_ago=100, keys=keys)
    store = MemoryStore()
    report = await sweep(tmp_path, store, retention_days=30, now=NOW, dry_run=True)
    assert old.exists()
    assert [d.id for d in report.deleted] == ["rec-old"]
    assert await store.list_audit() == []


async def test_sweeper_runs_at_start_and_stops(tmp_path: Path, keys: RecordingKeys) -> None:
    old = make_recording(tmp_path, "rec-old", room="r1", stopped_days_ago=100, keys=keys)
    store = MemoryStore()
    sweeper = RetentionSweeper(tmp_path, store, retention_days=30, interval=3600)
    sweeper.start()
    for _ in range(200):
        if await store.list_audit():
            break
        await asyncio.sleep(0.01)
    await sweeper.stop()
    assert not old.exists()
    assert [e.target for e in await store.list_audit()] == ["rec-old"]


def test_cli_purge_expired_dry_run_then_purge(
    tmp_path: Path,
    keys: RecordingKeys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("KONSILIUM_CONFIG", "KONSILIUM_REDIS_URL", "KONSILIUM_RETENTION_DAYS"):
        monkeypatch.delenv(name, raising=False)
    old = make_recording(tmp_path, "rec-old", room="r1", stopped_days_ago=1000, keys=keys)
    monkeypatch.setenv("KONSILIUM_RETENTION_DAYS", "30")
    from signalling import cli

    assert cli.main(["recordings", "purge-expired", "--dry-run", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "would delete rec-old" in out and old.exists()

    assert cli.main(["recordings", "purge-expired", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "deleted rec-old" in out and not old.exists()
    audit = tmp_path / recordings_cli.CLI_AUDIT_FILE
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    expired = [e for e in lines if e["action"] == EXPIRED_ACTION]
    assert [(e["target"], e["outcome"]) for e in expired] == [("rec-old", "deleted")]
    assert expired[0]["actor"].startswith("cli:")


def test_retention_days_setting_from_toml_env_and_flag(tmp_path: Path) -> None:
    assert Settings().retention_days == 0
    config = tmp_path / "k.toml"
    config.write_text("retention_days = 90\n")
    assert load_settings({}, {}, config).retention_days == 90
    env = {"KONSILIUM_RETENTION_DAYS": "60"}
    assert load_settings({}, env, config).retention_days == 60
    assert load_settings({"retention_days": 7}, env, config).retention_days == 7
    for bad in (-1, 36501):
        with pytest.raises(SettingsError, match="retention_days"):
            Settings(retention_days=bad)
    with pytest.raises(SettingsError, match="KONSILIUM_RETENTION_DAYS"):
        load_settings({}, {"KONSILIUM_RETENTION_DAYS": "ten"}, None)
