"""Recorder: one room's recording — every published track to segments, and its manifest.

A :class:`Recorder` owns ``data_dir/recordings/<recording_id>/``: the manifest
(``recording.manifest``) and one :class:`~recording.segments.TrackWriter` per
recorded track.  It attaches a sink to each Forwarder of the room (those present
at the start, and through ``MediaRoom.listeners`` those published later), so a
late joiner, a screen share or a reconnect gets its own track with its own
``offset_s`` on the session clock.  Signalling tells it about joins, leaves,
mutes and consent answers; they go into the manifest as they happen.

Threads: every method runs on the event loop and returns without waiting for
the disk.  Packets go to the writers (``push`` never blocks); manifest entries
are written, in order, by a journal task on the shared executor; segments are
appended to the manifest by the writer's worker thread as they are finished.

Consent: each participant present at the start or joining later is asked
(``consent_requested``); answers are ``consent`` entries; who never answered is
listed at the stop (``consent_pending``).  With ``consent_required`` nothing is
captured until everyone present has consented, and a participant's own tracks
only while that participant's consent stands.

Encryption at rest: with a ``data_key`` every segment and the manifest's
personal data are stored encrypted (``recording.segments``,
``recording.manifest``).

Failures: a disk-full error (ENOSPC, EDQUOT) from a writer or the manifest
calls ``on_failure(recorder, "disk_full")`` once, on the event loop; the owner
then stops the recording.  After a manifest write error the manifest is left as
it is (no more appends): at the stop it is reopened (which cuts a torn last
line, on record) and, if the disk allows, stopped and sealed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from media_server.forwarder import Forwarder
from media_server.packet import MediaPacket
from media_server.room import MediaRoom
from recording.keyring import DataKey
from recording.manifest import Manifest, ManifestError, iso_utc
from recording.segments import (
    Kind,
    RecordingError,
    SegmentInfo,
    TrackWriter,
    _OpenSegment,
)

log = logging.getLogger(__name__)

ConsentState = Literal["pending", "granted", "declined"]
FailureCallback = Callable[["Recorder", str], None]
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
WRITER_CLOSE_TIMEOUT_S = 30.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class RecorderStateError(RecordingError):
    """The recorder was asked to do something its state does not allow."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


@dataclass(frozen=True, slots=True)
class ParticipantInfo:
    """Who is in the record: what the manifest keeps of a participant."""

    id: str
    name: str
    clinic: str
    tier: str
    role: str


@dataclass(frozen=True, slots=True)
class RecordingOptions:
    consultation_id: str | None = None  # the room id when not given
    patient_ref: str | None = None  # FHIR reference, e.g. "Patient/123"
    consent_required: bool = False


@dataclass(slots=True)
class StopResult:
    reason: str
    sealed: bool
    tracks: int
    segments: int
    worker_cpu_s: float = 0.0  # CPU the track writers' threads spent, for the benchmark
    loop_s: float = 0.0  # time the tracks' sinks took on the event loop


# ---------------------------------------------------------------- writer + sink


class _Writer(TrackWriter):
    """A TrackWriter that also reports disk-full errors.

    TrackWriter logs a muxing error, abandons the segment and carries on (the
    next keyframe may fit again); a recording on a full disk must stop instead,
    so the three places where it touches the disk are wrapped.
    """

    def __init__(self, *args: Any, on_disk_full: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_disk_full = on_disk_full

    def _check(self, exc: BaseException) -> None:
        if is_disk_full(exc):
            self._on_disk_full()

    def _open_segment(self, packet: MediaPacket) -> _OpenSegment:
        try:
            return super()._open_segment(packet)
        except OSError as exc:
            self._check(exc)
            raise

    def _mux(self, seg: _OpenSegment, packet: MediaPacket, duration: int) -> None:
        try:
            super()._mux(seg, packet, duration)
        except OSError as exc:
            self._check(exc)
            raise

    def _finish_segment(self, end_pts: int | None) -> None:
        try:
            super()._finish_segment(end_pts)
        except OSError as exc:
            self._check(exc)
            raise


@dataclass(eq=False, slots=True)
class _Track:
    """One recorded track: its writer, and the sink attached to the Forwarder."""

    name: str  # the track id in the recording (directory name)
    forwarder: Forwarder
    writer: _Writer
    recorder: Recorder
    announced: bool = False
    loop_s: float = 0.0  # time spent here on the event loop (the forwarding path's share)

    def push(self, item: Any) -> None:
        """Forwarder sink: on the event loop, for every packet; must stay cheap."""
        if not isinstance(item, MediaPacket):
            return  # decoded frames (reencode mode) are not recorded
        started = time.perf_counter()
        self.writer.push(item)
        if not self.announced and self.writer.first_packet_wall is not None:
            self.announced = True
            self.recorder._track_started(self)
        self.loop_s += time.perf_counter() - started


# ---------------------------------------------------------------- recorder


@dataclass(slots=True)
class _Person:
    info: ParticipantInfo
    consent: ConsentState = "pending"
    present: bool = True


@dataclass(slots=True)
class _Counters:
    tracks: int = 0
    segments: int = 0
    bytes: int = 0


class Recorder:
    """One recording of one room; see the module docstring."""

    def __init__(
        self,
        recording_id: str,
        room_id: str,
        directory: Path,
        media_room: MediaRoom,
        *,
        private_key: Ed25519PrivateKey,
        executor: Executor,
        started_by: str,
        options: RecordingOptions | None = None,
        segment_seconds: float = 4.0,
        on_failure: FailureCallback | None = None,
        clock: Callable[[], float] = time.time,
        data_key: DataKey | None = None,
    ) -> None:
        self.id = recording_id
        self.room_id = room_id
        self.directory = directory
        self.media_room = media_room
        self.started_by = started_by
        self.options = options or RecordingOptions()
        self.segment_seconds = segment_seconds
        self.session_start = 0.0
        self.state: Literal["new", "recording", "stopping", "stopped"] = "new"
        self.stop_reason: str | None = None
        self.counters = _Counters()
        self._key = private_key
        self._data_key = data_key
        self._executor = executor
        self._on_failure = on_failure
        self._clock = clock
        self._capturing = not self.options.consent_required
        self._people: dict[str, _Person] = {}
        self._tracks: dict[Forwarder, _Track] = {}
        self._all_tracks: list[_Track] = []  # every track of the recording, for its CPU time
        self._names: set[str] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._journal: asyncio.Queue[Callable[[Manifest], object]] = asyncio.Queue()
        self._journal_task: asyncio.Task[None] | None = None
        self._manifest: Manifest | None = None
        self._manifest_lock = threading.Lock()
        self._manifest_broken = False
        self._fail_lock = threading.Lock()
        self._failed: str | None = None
        self._stop_task: asyncio.Task[StopResult] | None = None

    def __repr__(self) -> str:
        return f"Recorder({self.id} room={self.room_id})"

    # ------------------------------------------------------------ state

    @property
    def capturing(self) -> bool:
        return self._capturing

    @property
    def recording(self) -> bool:
        return self.state == "recording"

    def consent(self) -> dict[str, ConsentState]:
        """Consent of each participant present (granted, declined, pending)."""
        return {pid: p.consent for pid, p in self._people.items() if p.present}

    def status(self) -> dict[str, Any]:
        """JSON for signalling: ``recording_started`` / ``recording_status`` fields."""
        return {
            "recording_id": self.id,
            "started_by": self.started_by,
            "started_at": iso_utc(datetime.fromtimestamp(self.session_start, UTC)),
            "consent_required": self.options.consent_required,
            "capturing": self._capturing,
            "consent": self.consent(),
        }

    def session_time(self) -> float:
        return round(self._clock() - self.session_start, 3)

    # ------------------------------------------------------------ start

    async def start(self, participants: Iterable[ParticipantInfo]) -> None:
        """Create the directory and manifest, then attach to the room's tracks."""
        if self.state != "new":
            raise RecorderStateError(f"{self.id} is {self.state}")
        self._loop = asyncio.get_running_loop()
        people = list(participants)
        self.session_start = self._clock()
        await self._loop.run_in_executor(self._executor, self._open, people)
        for info in people:
            self._people[info.id] = _Person(info)
        self.state = "recording"
        self._journal_task = asyncio.ensure_future(self._run_journal())
        self.media_room.listeners.append(self._on_track)
        if self._capturing:
            self._attach_all()
        log.info(
            "%r: started, %d participants, consent %s",
            self,
            len(people),
            "required" if self.options.consent_required else "asked",
        )

    def _open(self, people: list[ParticipantInfo]) -> None:
        """Executor: the directory, the manifest and its first entries (raises OSError)."""
        self.directory.mkdir(parents=True, exist_ok=False)
        manifest = Manifest(self.directory, key=self._data_key)
        try:
            data: dict[str, Any] = {
                "recording_id": self.id,
                "room": self.room_id,
                "consultation_id": self.options.consultation_id or self.room_id,
                "started_by": self.started_by,
                "session_start": self.session_start,
                "settings": {
                    "consent_required": self.options.consent_required,
                    "segment_seconds": self.segment_seconds,
                },
            }
            if self.options.patient_ref is not None:
                data["patient_ref"] = self.options.patient_ref
            at = datetime.fromtimestamp(self.session_start, UTC)
            manifest.append("recording_started", data, at=at)
            for info in people:
                _write_participant(manifest, info, 0.0)
        except BaseException:
            manifest.close()
            raise
        self._manifest = manifest

    # ------------------------------------------------------------ signalling events

    def participant_joined(self, info: ParticipantInfo) -> None:
        if not self.recording:
            return
        known = self._people.get(info.id)
        if known is None:
            self._people[info.id] = _Person(info)
            offset = self.session_time()
            self._log(lambda m: _write_participant(m, info, offset))
        else:
            known.present = True
            known.info = info
            known.consent = "pending"  # a new session is asked again
            self._event("join", info.id, {})
            self._log(lambda m: m.event("consent_requested", participant_id=info.id))

    def participant_left(self, participant_id: str, reason: str) -> bool:
        """Note a leave; True when it let capture begin (the last one missing consent left)."""
        if not self.recording:
            return False
        person = self._people.get(participant_id)
        if person is not None:
            person.present = False
        self._event("leave", participant_id, {"reason": reason})
        return self._maybe_begin_capture()

    def muted(self, participant_id: str, source: str, muted: bool) -> None:
        if self.recording:
            self._event("mute" if muted else "unmute", participant_id, {"source": source})

    def set_consent(self, participant_id: str, granted: bool) -> bool:
        """Record a consent answer; True when it changed what is captured."""
        if not self.recording:
            raise RecorderStateError(f"{self.id} is {self.state}")
        person = self._people.get(participant_id)
        if person is None or not person.present:
            raise RecorderStateError(f"{participant_id} is not in the recording")
        person.consent = "granted" if granted else "declined"
        at = datetime.now(UTC)
        self._log(lambda m: m.consent(participant_id, granted=granted, at=at))
        if not self.options.consent_required:
            return False
        if not self._capturing:
            return self._maybe_begin_capture()
        if granted:
            self._attach_participant(participant_id)
        else:
            for track in [t for t in self._tracks.values() if _owner(t) == participant_id]:
                self._close_track(track, "consent_withdrawn")
        return True

    def _event(self, kind: str, participant_id: str | None, data: Mapping[str, Any]) -> None:
        body = {"offset_s": self.session_time(), **data}
        self._log(lambda m: m.event(kind, body, participant_id=participant_id))

    # ------------------------------------------------------------ capture

    def _maybe_begin_capture(self) -> bool:
        if self._capturing or not self.recording:
            return False
        present = [p for p in self._people.values() if p.present]
        if not present or any(p.consent != "granted" for p in present):
            return False
        self._capturing = True
        self._event("capture_started", None, {})
        self._attach_all()
        log.info("%r: everyone present consented, capture started", self)
        return True

    def _may_record(self, participant_id: str) -> bool:
        if not self._capturing:
            return False
        if not self.options.consent_required:
            return True
        person = self._people.get(participant_id)
        return person is not None and person.present and person.consent == "granted"

    def _attach_all(self) -> None:
        for forwarder in list(self.media_room.forwarders.values()):
            if self._may_record(forwarder.info.participant_id):
                self._attach(forwarder)

    def _attach_participant(self, participant_id: str) -> None:
        for forwarder in list(self.media_room.forwarders.values()):
            if forwarder.info.participant_id == participant_id:
                self._attach(forwarder)

    def _on_track(self, forwarder: Forwarder, published: bool) -> None:
        """MediaRoom listener (event loop)."""
        if not self.recording:
            return
        if published:
            if self._may_record(forwarder.info.participant_id):
                self._attach(forwarder)
        else:
            track = self._tracks.get(forwarder)
            if track is not None:
                self._close_track(track, "unpublished")

    def _attach(self, forwarder: Forwarder) -> None:
        if forwarder in self._tracks or forwarder.closed:
            return
        kind = forwarder.info.kind
        if kind not in ("audio", "video"):
            log.warning("%r: %s is neither audio nor video, not recorded", self, forwarder)
            return
        kind_: Kind = "audio" if kind == "audio" else "video"
        name = self._track_name(forwarder)
        writer = _Writer(
            name,
            kind_,
            self.directory,
            self.session_start,
            segment_seconds=self.segment_seconds,
            on_segment=self._on_segment,
            on_keyframe_needed=forwarder.request_keyframe,
            executor=self._executor,
            clock=self._clock,
            on_disk_full=lambda: self._fail("disk_full"),
            key=self._data_key,
        )
        track = _Track(name, forwarder, writer, self)
        self._tracks[forwarder] = track
        self._all_tracks.append(track)
        self.counters.tracks += 1
        forwarder.attach(track)
        if kind_ == "video":
            forwarder.request_keyframe()  # the writer starts on a keyframe
        log.debug("%r: recording %s as %s", self, forwarder.info.id, name)

    def _track_name(self, forwarder: Forwarder) -> str:
        """A directory-safe, unique name: ``<participant>.<source>`` (``.2``… on republish)."""
        base = _UNSAFE.sub("_", f"{forwarder.info.participant_id}.{forwarder.info.source}")
        if not base[0].isalnum():
            base = "p" + base
        base = base[:120]
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}.{n}"
        self._names.add(name)
        return name

    def _track_started(self, track: _Track) -> None:
        info = track.forwarder.info
        offset = track.writer.offset_s or 0.0
        codec = track.writer.codec
        self._log(
            lambda m: m.track_started(
                track.name,
                participant_id=info.participant_id,
                kind=info.kind,
                source=info.source,
                codec=codec,
                offset_s=offset,
            )
        )

    def _close_track(self, track: _Track, why: str) -> None:
        if self._tracks.get(track.forwarder) is track:
            del self._tracks[track.forwarder]
        track.forwarder.detach(track)
        task = asyncio.ensure_future(self._finish_track(track, why))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _finish_track(self, track: _Track, why: str) -> None:
        ended = self.session_time()
        try:
            await asyncio.wait_for(track.writer.aclose(), WRITER_CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.error("%r: %s did not close in time", self, track.name)
        if not track.announced:
            return  # no packet ever came: the track is not in the record
        stats: dict[str, Any] = {
            "reason": why,
            "ended_offset_s": ended,
            **asdict(track.writer.stats),
        }
        self._log(lambda m: m.track_ended(track.name, stats=stats))

    # ------------------------------------------------------------ manifest

    def _log(self, write: Callable[[Manifest], object]) -> None:
        """Queue one manifest write; the journal task writes them in order."""
        self._journal.put_nowait(write)

    async def _run_journal(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            write = await self._journal.get()
            try:
                await loop.run_in_executor(self._executor, self._write, write)
            except Exception:
                log.exception("%r: manifest write failed", self)
            finally:
                self._journal.task_done()

    def _write(self, write: Callable[[Manifest], object]) -> bool:
        """Any thread: one manifest append, unless the manifest is broken."""
        with self._manifest_lock:
            manifest = self._manifest
            if manifest is None or self._manifest_broken:
                return False
            try:
                write(manifest)
            except OSError as exc:
                self._manifest_broken = True
                manifest.close()
                log.error("%r: manifest write failed (%s), no more entries", self, exc.strerror)
                self._fail("disk_full" if is_disk_full(exc) else "error")
                return False
            except ManifestError as exc:
                log.error("%r: manifest refused an entry: %s", self, exc)
                return False
            return True

    def _on_segment(self, info: SegmentInfo) -> None:
        """Writer worker thread: a finished segment goes into the manifest now."""

        def write(manifest: Manifest) -> None:
            manifest.segment(info)
            self.counters.segments += 1  # under the manifest lock
            self.counters.bytes += info.size

        self._write(write)

    # ------------------------------------------------------------ failure

    def _fail(self, reason: str) -> None:
        """Any thread: report a failure to the owner once, on the event loop."""
        with self._fail_lock:
            if self._failed is not None:
                return
            self._failed = reason
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing
            loop.call_soon_threadsafe(self._report_failure, reason)

    def _report_failure(self, reason: str) -> None:
        log.error("%r: recording failed: %s", self, reason)
        if self._on_failure is not None and self.recording:
            try:
                self._on_failure(self, reason)
            except Exception:
                log.exception("%r: failure callback failed", self)

    # ------------------------------------------------------------ stop

    async def stop(self, reason: str = "stopped") -> StopResult:
        """Close every writer, write ``recording_stopped`` and seal; safe to call twice."""
        if self._stop_task is None:
            if self.state == "new":
                raise RecorderStateError(f"{self.id} was never started")
            self.state = "stopping"
            self.stop_reason = reason
            self._stop_task = asyncio.ensure_future(self._stop(reason))
        return await asyncio.shield(self._stop_task)

    async def _stop(self, reason: str) -> StopResult:
        with contextlib.suppress(ValueError):
            self.media_room.listeners.remove(self._on_track)
        for track in list(self._tracks.values()):
            self._close_track(track, "recording_stopped")
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
        pending = sorted(pid for pid, p in self._people.items() if p.consent == "pending")
        if pending:
            self._log(lambda m: m.event("consent_pending", {"participant_ids": pending}))
        await self._journal.join()
        if self._journal_task is not None:
            self._journal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._journal_task
        loop = asyncio.get_running_loop()
        sealed = await loop.run_in_executor(self._executor, self._seal, reason)
        self.state = "stopped"
        result = StopResult(
            reason,
            sealed,
            self.counters.tracks,
            self.counters.segments,
            worker_cpu_s=sum(t.writer.stats.cpu_s for t in self._all_tracks),
            loop_s=sum(t.loop_s for t in self._all_tracks),
        )
        log.info(
            "%r: stopped (%s), %d tracks, %d segments, %s",
            self,
            reason,
            result.tracks,
            result.segments,
            "sealed" if sealed else "NOT sealed",
        )
        return result

    def _seal(self, reason: str) -> bool:
        """Executor: recording_stopped + seal; after a write error, reopen first."""
        with self._manifest_lock:
            manifest, self._manifest = self._manifest, None
            try:
                if manifest is None or self._manifest_broken:
                    if manifest is not None:
                        manifest.close()
                    # cuts a torn last line, on record
                    manifest = Manifest(self.directory, key=self._data_key)
                manifest.recording_stopped(reason=reason)
                manifest.seal(self._key)
                return True
            except (OSError, ManifestError) as exc:
                log.error("%r: could not seal the manifest: %s", self, exc)
                return False
            finally:
                if manifest is not None:
                    manifest.close()


def _owner(track: _Track) -> str:
    return track.forwarder.info.participant_id


def _write_participant(manifest: Manifest, info: ParticipantInfo, offset_s: float) -> None:
    manifest.participant(
        info.id, name=info.name, clinic=info.clinic, tier=info.tier, role=info.role
    )
    manifest.event("join", {"offset_s": offset_s}, participant_id=info.id)
    manifest.event("consent_requested", participant_id=info.id)
