"""Recordings: this node's recordings on disk and the rooms being recorded now.

One :class:`Recordings` per server process, opened and closed in the app's
cleanup context.  It holds the server's recording key, the one executor every
TrackWriter and manifest write shares, and at most one active
:class:`~recording.recorder.Recorder` per room.  Whoever stops a recording (a
participant, the REST API, a full disk, the room emptying, shutdown), the
``stopped`` listeners hear of it once, after the manifest is sealed.

Layout: ``<data_dir>/recordings/<recording_id>/manifest.jsonl`` and
``…/tracks/<track>/<index>.webm`` (see ``recording.segments``).

Encryption at rest: with a :class:`~recording.keyring.Keyring` (setting
``recording_key_file``) new recordings are encrypted with its active key, and
every reader gets the keyring to decrypt (``recording.storage``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from media_server.room import MediaRoom
from recording.keyring import Keyring
from recording.manifest import MANIFEST_NAME, RecordingKeys
from recording.manifest import read_entries as read_stored_entries
from recording.recorder import (
    ParticipantInfo,
    Recorder,
    RecordingOptions,
    StopResult,
    is_disk_full,
)
from recording.segments import RecordingError
from recording.storage import entry_key_id, read_entries
from recording.verify import VerifyReport, verify_recording

log = logging.getLogger(__name__)

RECORDINGS_DIR = "recordings"
RECORDING_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
DEFAULT_WORKERS = 2

StoppedListener = Callable[[Recorder, StopResult], Awaitable[None]]


class RecordingActive(RecordingError):
    """The room is already being recorded."""


class NotRecording(RecordingError):
    """The room is not being recorded."""


class UnknownRecording(RecordingError):
    """No recording with that id (or the id is not a valid one)."""


class RecordingStartFailed(RecordingError):
    """The recording directory or its manifest could not be created."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def new_recording_id(now: datetime | None = None) -> str:
    """``rec-20250901T100000Z-1a2b3c4d``: sortable by start time, never guessed."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"rec-{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def recordings_root(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / RECORDINGS_DIR


def recording_dir(data_dir: str | os.PathLike[str], recording_id: str) -> Path:
    """The directory of an existing recording; UnknownRecording otherwise."""
    if not RECORDING_ID_RE.match(recording_id):
        raise UnknownRecording("not a recording id")
    path = recordings_root(data_dir) / recording_id
    if not (path / MANIFEST_NAME).is_file():
        raise UnknownRecording(f"no recording {recording_id}")
    return path


@dataclass(frozen=True, slots=True)
class RecordingSummary:
    """What a listing shows of one recording (no names, no patient data)."""

    id: str
    room: str | None
    consultation_id: str | None
    started_at: str | None
    stopped_at: str | None
    stop_reason: str | None
    sealed: bool
    participants: int
    tracks: int
    segments: int
    bytes: int  # as stored
    encrypted: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(directory: Path, keyring: Keyring | None = None) -> RecordingSummary:
    """Read one recording's manifest (unchecked: ``verify`` is the check).

    An encrypted recording whose key is not configured is summarised from what
    is in the clear (counts and times; no room, no consultation).
    """
    try:
        stored = read_stored_entries(directory)
    except (OSError, ValueError):
        stored = []
    encrypted = any(entry_key_id(e) for e in stored if isinstance(e, dict))
    try:
        entries = read_entries(directory, keyring) if encrypted else stored
    except (OSError, ValueError, RecordingError):
        entries = stored
    started = next((e for e in entries if e.get("type") == "recording_started"), None)
    stopped = next((e for e in entries if e.get("type") == "recording_stopped"), None)
    data: dict[str, Any] = started.get("data", {}) if started else {}
    segments = [e for e in entries if e.get("type") == "segment"]
    return RecordingSummary(
        id=directory.name,
        room=_str_or_none(data.get("room")),
        consultation_id=_str_or_none(data.get("consultation_id")),
        started_at=_str_or_none(started.get("at")) if started else None,
        stopped_at=_str_or_none(stopped.get("at")) if stopped else None,
        stop_reason=_str_or_none(stopped.get("data", {}).get("reason")) if stopped else None,
        sealed=any(e.get("type") == "sealed" for e in entries),
        participants=sum(1 for e in entries if e.get("type") == "participant"),
        tracks=sum(1 for e in entries if e.get("type") == "track_started"),
        segments=len(segments),
        bytes=sum(int(e.get("data", {}).get("size", 0)) for e in segments),
        encrypted=encrypted,
    )


def list_recordings(
    data_dir: str | os.PathLike[str], keyring: Keyring | None = None
) -> list[RecordingSummary]:
    """Every recording under ``data_dir``, oldest first (blocking: disk reads)."""
    root = recordings_root(data_dir)
    if not root.is_dir():
        return []
    found = [
        summarize(path, keyring)
        for path in root.iterdir()
        if RECORDING_ID_RE.match(path.name) and (path / MANIFEST_NAME).is_file()
    ]
    return sorted(found, key=lambda s: (s.started_at or "", s.id))


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


class Recordings:
    """The recordings of this node; see the module docstring."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        keys: RecordingKeys,
        *,
        keyring: Keyring | None = None,
        executor: Executor | None = None,
        segment_seconds: float = 4.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.root = recordings_root(data_dir)
        self.keys = keys
        self.keyring = keyring  # encryption at rest; None: recordings are stored in the clear
        self.segment_seconds = segment_seconds
        self._own_executor = executor is None
        self.executor: Executor = executor or ThreadPoolExecutor(
            max_workers=DEFAULT_WORKERS, thread_name_prefix="recording"
        )
        self.active: dict[str, Recorder] = {}  # room id -> recorder
        self.stopped_listeners: list[StoppedListener] = []
        self._starting: set[str] = set()
        self._stopping: dict[str, tuple[Recorder, asyncio.Task[StopResult]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"Recordings({self.root}, active={len(self.active)})"

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        key_file: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Recordings:
        """Load (or create) the signing key in ``data_dir``, and the encryption keys in
        ``key_file`` if given (EncryptionKeyError when it is unusable); make the registry."""
        keyring = Keyring.load(key_file) if key_file is not None else None
        if keyring is not None:
            log.info("recordings are encrypted at rest with key %s", keyring.active.id)
        return cls(data_dir, RecordingKeys.load_or_create(data_dir), keyring=keyring, **kwargs)

    def get(self, room_id: str) -> Recorder | None:
        return self.active.get(room_id)

    # ------------------------------------------------------------ start / stop

    async def start(
        self,
        room_id: str,
        media_room: MediaRoom,
        participants: Iterable[ParticipantInfo],
        *,
        started_by: str,
        options: RecordingOptions | None = None,
    ) -> Recorder:
        if self._closed:
            raise RecordingStartFailed("the server is shutting down")
        if room_id in self.active or room_id in self._starting or room_id in self._stopping:
            raise RecordingActive(f"room {room_id} is already being recorded")
        self._starting.add(room_id)
        try:
            recording_id = new_recording_id()
            recorder = Recorder(
                recording_id,
                room_id,
                self.root / recording_id,
                media_room,
                private_key=self.keys.private_key,
                executor=self.executor,
                started_by=started_by,
                options=options,
                segment_seconds=self.segment_seconds,
                on_failure=self._on_failure,
                data_key=self.keyring.active if self.keyring is not None else None,
            )
            try:
                await recorder.start(participants)
            except OSError as exc:
                log.error("recording of room %s could not start: %s", room_id, exc.strerror)
                raise RecordingStartFailed(
                    "the recording could not be created on disk",
                    disk_full=is_disk_full(exc),
                ) from exc
            self.active[room_id] = recorder
            return recorder
        finally:
            self._starting.discard(room_id)

    async def stop(self, room_id: str, reason: str = "stopped") -> tuple[Recorder, StopResult]:
        """Stop the room's recording; listeners are told once, after the seal."""
        stopping = self._stopping.get(room_id)
        if stopping is None:
            recorder = self.active.get(room_id)
            if recorder is None:
                raise NotRecording(f"room {room_id} is not being recorded")
            stopping = (recorder, asyncio.ensure_future(self._stop(room_id, recorder, reason)))
            self._stopping[room_id] = stopping
        recorder, task = stopping
        return recorder, await asyncio.shield(task)

    async def _stop(self, room_id: str, recorder: Recorder, reason: str) -> StopResult:
        try:
            result = await recorder.stop(reason)
            for listener in list(self.stopped_listeners):
                try:
                    await listener(recorder, result)
                except Exception:
                    log.exception("%r: a stopped listener failed", recorder)
            return result
        finally:
            if self.active.get(room_id) is recorder:
                del self.active[room_id]
            self._stopping.pop(room_id, None)

    def _on_failure(self, recorder: Recorder, reason: str) -> None:
        """Recorder failure (event loop): stop that recording with ``reason``."""
        if self.active.get(recorder.room_id) is not recorder:
            return
        task = asyncio.ensure_future(self._stop_quietly(recorder.room_id, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_quietly(self, room_id: str, reason: str) -> None:
        try:
            await self.stop(room_id, reason)
        except NotRecording:
            pass
        except Exception:
            log.exception("recording of room %s: stop after failure failed", room_id)

    # ------------------------------------------------------------ on disk

    def directory(self, recording_id: str) -> Path:
        return recording_dir(self.data_dir, recording_id)

    def is_active(self, recording_id: str) -> bool:
        return any(r.id == recording_id for r in self.active.values())

    def summaries(self) -> list[RecordingSummary]:
        """Blocking (reads every manifest): call it off the event loop."""
        return list_recordings(self.data_dir, self.keyring)

    def summary(self, recording_id: str) -> RecordingSummary:
        return summarize(self.directory(recording_id), self.keyring)

    def entries(self, recording_id: str) -> list[dict[str, Any]]:
        """Blocking: the decrypted manifest entries (KeyUnavailable, DecryptionError)."""
        return read_entries(self.directory(recording_id), self.keyring)

    def verify(self, recording_id: str) -> VerifyReport:
        """Blocking (hashes every segment): call it off the event loop."""
        return verify_recording(self.directory(recording_id), self.keys.public_key())

    # ------------------------------------------------------------ lifetime

    async def stop_all(self, reason: str) -> Sequence[StopResult]:
        results = []
        for room_id in list(self.active):
            try:
                results.append((await self.stop(room_id, reason))[1])
            except NotRecording:
                pass
        return results

    async def close(self) -> None:
        """Stop and seal every active recording, then the executor; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self.stop_all("shutdown")
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        if self._own_executor:
            await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)
