"""Retention: remove recordings older than their room's (or the server's) retention period.

A recording ``<data_dir>/recordings/<id>/`` is *expired* when its manifest is
sealed, has a ``recording_stopped`` entry, and that entry's time is older than
the retention period: the room's ``retention_days`` setting when the room is in
the Store and has one, else the server's ``retention_days``.  0 days means keep
forever.  A recording that is still being recorded, or was never sealed (a crash
leftover), is never deleted: it is reported as ``incomplete`` for a person to
look at.

An encrypted recording is read with the configured keyring; one whose key is
not configured cannot tell its room (nor so its retention period): it is kept
and reported as ``locked``.

Each deletion removes the directory, then appends an ``recording_expired``
audit event.  Logs name recording ids only (never participants or patients).

:func:`sweep` does one pass; :class:`RetentionSweeper` runs it at start and then
every hour in the server (file work in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from recording.errors import RecordingError
from recording.keyring import Keyring
from recording.manifest import MANIFEST_NAME
from recording.registry import RECORDING_ID_RE, recordings_root
from recording.storage import read_entries

if TYPE_CHECKING:
    from signalling.store import AuditEvent, Store

log = logging.getLogger(__name__)

RETENTION_DAYS_MAX = 36500
SWEEP_INTERVAL_S = 3600.0
SYSTEM_ACTOR = "system"
EXPIRED_ACTION = "recording_expired"

AuditSink = Callable[["AuditEvent"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RecordingState:
    """What retention needs from one manifest (no names, no patient data)."""

    id: str
    path: Path
    room: str | None
    stopped_at: str | None  # the recording_stopped entry's time, as written
    finished: bool  # sealed and stopped: the only recordings that may expire
    locked: bool = False  # encrypted, and its key is not configured (or it does not decrypt)


@dataclass(frozen=True, slots=True)
class Decision:
    id: str
    room: str | None
    stopped_at: str | None
    retention_days: int


@dataclass(slots=True)
class SweepReport:
    deleted: list[Decision] = field(default_factory=list)  # or "would delete" on a dry run
    kept: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # never sealed/stopped, or unreadable
    failed: list[Decision] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)  # encrypted with a key not configured: kept
    dry_run: bool = False


def valid_retention_days(value: object) -> int | None:
    """``value`` as a retention period in days, or None when it is not a valid one."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= RETENTION_DAYS_MAX else None


def parse_time(text: str | None) -> datetime | None:
    """A manifest ``at`` (``2025-09-01T10:00:00.123Z``) as an aware datetime; None if bad."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read_state(directory: Path, keyring: Keyring | None = None) -> RecordingState:
    """Blocking: read one manifest.  Unreadable manifests count as not finished."""
    try:
        entries = read_entries(directory, keyring)
    except RecordingError:  # KeyUnavailable, DecryptionError
        return RecordingState(directory.name, directory, None, None, False, locked=True)
    except (OSError, ValueError):
        entries = []
    room: str | None = None
    stopped_at: str | None = None
    stopped = sealed = False
    for entry in entries:
        kind = entry.get("type")
        if kind == "recording_started" and room is None:
            data = entry.get("data")
            value = data.get("room") if isinstance(data, dict) else None
            room = value if isinstance(value, str) else None
        elif kind == "recording_stopped":
            stopped = True
            at = entry.get("at")
            stopped_at = at if isinstance(at, str) else None
        elif kind == "sealed":
            sealed = True
    last_is_seal = bool(entries) and entries[-1].get("type") == "sealed"
    finished = sealed and last_is_seal and stopped and parse_time(stopped_at) is not None
    return RecordingState(directory.name, directory, room, stopped_at, finished)


def scan(data_dir: str | os.PathLike[str], keyring: Keyring | None = None) -> list[RecordingState]:
    """Blocking: every recording directory under ``data_dir`` (symlinks are skipped)."""
    root = recordings_root(data_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not RECORDING_ID_RE.match(path.name) or path.is_symlink() or not path.is_dir():
            continue
        if not (path / MANIFEST_NAME).is_file():
            continue
        found.append(read_state(path, keyring))
    return found


async def room_retention(store: Store | None, room: str | None, default_days: int) -> int:
    """The room's ``retention_days`` setting when stored and valid, else ``default_days``."""
    if store is None or room is None:
        return default_days
    record = await store.get_room(room)
    if record is None:
        return default_days
    override = valid_retention_days(record.settings.get("retention_days"))
    return default_days if override is None else override


def is_expired(state: RecordingState, days: int, now: datetime) -> bool:
    if days <= 0 or not state.finished:
        return False
    stopped = parse_time(state.stopped_at)
    return stopped is not None and stopped + timedelta(days=days) <= now


async def sweep(
    data_dir: str | os.PathLike[str],
    store: Store | None,
    *,
    retention_days: int,
    now: datetime | None = None,
    dry_run: bool = False,
    is_active: Callable[[str], bool] | None = None,
    audit: AuditSink | None = None,
    actor: str = SYSTEM_ACTOR,
    keyring: Keyring | None = None,
) -> SweepReport:
    """One pass: delete (or on a dry run, list) the expired recordings.

    ``audit`` receives one event per deletion (default: ``store.append_audit``);
    ``is_active(recording_id)`` protects recordings being written right now;
    ``keyring`` reads encrypted manifests.
    """
    from signalling.store import AuditEvent

    moment = now or datetime.now(UTC)
    sink = audit if audit is not None else (store.append_audit if store is not None else None)
    report = SweepReport(dry_run=dry_run)
    days_by_room: dict[str | None, int] = {}
    for state in await asyncio.to_thread(scan, data_dir, keyring):
        if state.locked:
            report.locked.append(state.id)
            continue
        if (is_active is not None and is_active(state.id)) or not state.finished:
            report.incomplete.append(state.id)
            continue
        if state.room not in days_by_room:
            days_by_room[state.room] = await room_retention(store, state.room, retention_days)
        days = days_by_room[state.room]
        if not is_expired(state, days, moment):
            report.kept.append(state.id)
            continue
        decision = Decision(state.id, state.room, state.stopped_at, days)
        if dry_run:
            report.deleted.append(decision)
            continue
        if is_active is not None and is_active(state.id):  # started meanwhile (id reuse)
            report.incomplete.append(state.id)
            continue
        ok = await asyncio.to_thread(_remove, state.path)
        outcome = "deleted" if ok else "delete_failed"
        (report.deleted if ok else report.failed).append(decision)
        if sink is not None:
            await sink(
                AuditEvent(
                    at=time.time(),
                    actor=actor,
                    action=EXPIRED_ACTION,
                    target=state.id,
                    outcome=outcome,
                    detail={
                        "room": state.room,
                        "stopped_at": state.stopped_at,
                        "retention_days": days,
                    },
                )
            )
    for recording_id in report.incomplete:
        if is_active is None or not is_active(recording_id):
            log.warning("retention: recording %s is not sealed and stopped; kept", recording_id)
    for locked_id in report.locked:
        log.warning("retention: recording %s cannot be read (key not configured); kept", locked_id)
    if report.deleted and not dry_run:
        log.info("retention: %d expired recording(s) deleted", len(report.deleted))
    return report


def _remove(path: Path) -> bool:
    """Blocking: remove one recording directory; False (logged) if it fails."""
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.error("retention: could not delete recording %s: %s", path.name, exc.strerror)
        return not path.exists()
    return True


class RetentionSweeper:
    """Runs :func:`sweep` at start and then every ``interval`` seconds until stopped."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        store: Store,
        *,
        retention_days: int,
        is_active: Callable[[str], bool] | None = None,
        interval: float = SWEEP_INTERVAL_S,
        keyring: Keyring | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.keyring = keyring
        self.store = store
        self.retention_days = retention_days
        self.is_active = is_active
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await sweep(
                    self.data_dir,
                    self.store,
                    retention_days=self.retention_days,
                    is_active=self.is_active,
                    keyring=self.keyring,
                )
            except Exception:
                log.exception("retention: sweep failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Let a sweep in progress finish (a deletion always gets its audit entry), then end."""
        task, self._task = self._task, None
        self._stopping.set()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
