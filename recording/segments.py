"""TrackWriter: one published track's packets, as received, into WebM segment files.

No transcoding: VP8 and Opus packets from the SFU are muxed with PyAV into
``tracks/<track_id>/<index:06d>.webm`` under the recording directory.  A segment
is written as ``….webm.part``, then closed, fsync'ed, hashed and renamed, and only
then reported through ``on_segment``; a crash leaves at most one ``.part`` file
per track (still mostly decodable) and loses nothing that was reported.

Encryption at rest (a ``key`` given): a segment is muxed into memory, never to
disk in the clear; when it is closed the whole file is encrypted
(``recording.cipher``) and only the ciphertext is written, as ``….webm.part``,
fsync'ed, hashed and renamed like a plain one.  The manifest's SHA-256 and size
are those of the stored (encrypted) file, so ``verify`` needs no key.  A crash
loses the segment in memory (at most ``3 × segment_seconds`` of the track),
never anything reported, and leaves no plaintext behind.

Threads: :meth:`TrackWriter.push` runs on the caller's thread (the event loop),
decides where segments are cut (cheap integer comparisons) and appends to a
bounded queue; all muxing, fsync and hashing run on a worker (a private
one-thread executor, or a shared executor passed in).  ``on_keyframe_needed`` is
called from ``push`` (caller's thread); ``on_segment`` from the worker thread.

Timing: file timestamps are track time (the first pushed packet is 0).  The
track's ``offset_s`` (first packet wall time minus the session start) places
track time on the session clock: ``session_s = offset_s + track_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, NamedTuple

import av
from av.container import InputContainer, OutputContainer
from av.stream import Stream

from media_server.packet import MediaPacket
from recording.cipher import encrypt_bytes
from recording.errors import RecordingError as RecordingError  # re-exported
from recording.keyring import DataKey

log = logging.getLogger(__name__)

Kind = Literal["audio", "video"]
TRACKS_DIR = "tracks"
BATCH_S = 0.1  # on an event loop, packets are handed to the muxing thread in batches
SEGMENT_SUFFIX = ".webm"
PARTIAL_SUFFIX = ".part"
_TRACK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SEGMENT_NAME_RE = re.compile(r"^(\d{6})\.webm(\.part)?$")
_CODECS: dict[str, str] = {"video": "vp8", "audio": "opus"}
_HASH_CHUNK = 1 << 20


def validate_track_id(track_id: str) -> str:
    """Track ids become directory names: allow only a safe, short alphabet."""
    if not _TRACK_ID_RE.match(track_id):
        raise ValueError(f"track id {track_id!r} is not [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}")
    return track_id


def segment_relpath(track_id: str, index: int) -> str:
    """Path of a finished segment relative to the recording directory (POSIX)."""
    return f"{TRACKS_DIR}/{track_id}/{index:06d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> tuple[int, bool] | None:
    """``000003.webm`` → (3, False); ``000003.webm.part`` → (3, True); else None."""
    m = _SEGMENT_NAME_RE.match(name)
    if m is None:
        return None
    return int(m.group(1)), m.group(2) is not None


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One closed, fsync'ed segment file, as reported to ``on_segment``."""

    track_id: str
    index: int
    path: str  # relative to the recording directory, POSIX separators
    start_pts_s: float  # track time of the first packet
    duration_s: float
    sha256: str  # hex
    size: int
    packets: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentInfo:
        try:
            info = cls(
                track_id=str(data["track_id"]),
                index=int(data["index"]),
                path=str(data["path"]),
                start_pts_s=float(data["start_pts_s"]),
                duration_s=float(data["duration_s"]),
                sha256=str(data["sha256"]),
                size=int(data["size"]),
                packets=int(data["packets"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed segment record: {exc}") from exc
        return info


@dataclass(slots=True)
class WriterStats:
    """Counters of one TrackWriter (read them at any time; approximate while running)."""

    received: int = 0
    written: int = 0
    dropped_queue_full: int = 0
    skipped_until_keyframe: int = 0
    rejected: int = 0  # wrong kind/time base, timestamps going backwards, after close
    segments: int = 0
    keyframe_requests: int = 0
    errors: int = 0
    cpu_s: float = 0.0  # thread CPU time spent muxing, sealing and writing (off the loop)
    overlong_segments: int = 0


# ---------------------------------------------------------------- bitstream


def vp8_dimensions(data: bytes) -> tuple[int, int] | None:
    """Width and height of a VP8 key frame (RFC 6386 §9.1), None for other frames."""
    if len(data) < 10 or data[0] & 1 or data[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(data[6:8], "little") & 0x3FFF
    height = int.from_bytes(data[8:10], "little") & 0x3FFF
    return (width, height) if width and height else None


_OPUS_FRAME_48K = (
    [480, 960, 1920, 2880] * 3  # SILK NB/MB/WB: 10, 20, 40, 60 ms
    + [480, 960] * 2  # hybrid SWB/FB: 10, 20 ms
    + [120, 240, 480, 960] * 4  # CELT: 2.5, 5, 10, 20 ms
)


def opus_packet_samples(data: bytes) -> int | None:
    """Duration of an Opus packet in 48 kHz samples (RFC 6716 §3.1), None if malformed."""
    if not data:
        return None
    toc = data[0]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    elif len(data) >= 2:
        frames = data[1] & 0x3F
    else:
        return None
    samples = frames * _OPUS_FRAME_48K[toc >> 3]
    return samples if 0 < samples <= 5760 else None


def opus_head(channels: int = 2, pre_skip: int = 0) -> bytes:
    """OpusHead (RFC 7845 §5.1) for WebM CodecPrivate; WebRTC's opus/48000/2 → 2 channels.

    Pre-skip is 0: RTP carries no pre-skip, so the file plays every sample a
    WebRTC receiver would play.
    """
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, 48000, 0, 0)


def _ogg_crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
            r &= 0xFFFFFFFF
        table.append(r)
    return tuple(table)


def _ogg_page(payload: bytes, seq: int, flags: int, granule: int) -> bytes:
    lacing = [255] * (len(payload) // 255) + [len(payload) % 255]
    header = b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, 1, seq, 0, len(lacing))
    page = header + bytes(lacing) + payload
    table = _ogg_crc_table()
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ byte) & 0xFF]
    return page[:22] + struct.pack("<I", crc) + page[26:]


def _opus_template() -> InputContainer:
    """A tiny in-memory Ogg Opus stream whose stream is the template for every audio segment.

    PyAV's ``add_mux_stream`` cannot carry extradata (OpusHead) and
    ``add_stream("libopus")`` opens an encoder whose pre-skip (312) the muxer
    would write as CodecDelay, dropping 6.5 ms at the start of every segment.
    """
    tags = b"OpusTags" + struct.pack("<I", 9) + b"konsilium" + struct.pack("<I", 0)
    silence = b"\xfc\xff\xfe"  # one 20 ms CELT frame, so the demuxer can probe
    data = (
        _ogg_page(opus_head(), 0, 0x02, 0)
        + _ogg_page(tags, 1, 0x00, 0)
        + _ogg_page(silence, 2, 0x04, 960)
    )
    return av.open(io.BytesIO(data), "r", format="ogg")


# ---------------------------------------------------------------- writer


class _Item(NamedTuple):
    packet: MediaPacket
    cut: bool  # close the open segment and start a new one with this packet


_CLOSE = None  # queue sentinel


@dataclass(slots=True)
class _OpenSegment:
    index: int
    part_path: Path
    container: OutputContainer
    stream: Stream
    start_pts: int
    buffer: io.BytesIO | None = None  # encrypted recordings mux into memory
    packets: int = 0
    pending: MediaPacket | None = None
    last_interval: int = 0


SegmentCallback = Callable[[SegmentInfo], None]


class TrackWriter:
    """Writes one track's packets into WebM segments; see the module docstring."""

    def __init__(
        self,
        track_id: str,
        kind: Kind,
        directory: str | os.PathLike[str],
        session_start: float,
        first_packet_wall: float | None = None,
        *,
        segment_seconds: float = 4.0,
        keyframe_request_after_s: float | None = None,
        on_segment: SegmentCallback | None = None,
        on_keyframe_needed: Callable[[], None] | None = None,
        executor: Executor | None = None,
        max_queue: int = 2000,
        clock: Callable[[], float] = time.time,
        key: DataKey | None = None,
    ) -> None:
        if kind not in _CODECS:
            raise ValueError(f"kind must be 'audio' or 'video', not {kind!r}")
        if segment_seconds <= 0:
            raise ValueError("segment_seconds must be positive")
        self.track_id = validate_track_id(track_id)
        self.kind: Kind = kind
        self.codec = _CODECS[kind]
        self.directory = Path(directory)
        self.session_start = session_start
        self.first_packet_wall = first_packet_wall
        self.segment_seconds = segment_seconds
        # Keyframes cost bandwidth on every subscriber's link: by default wait for one
        # to come by itself (a subscriber's PLI) until 2× segment_seconds, then ask.
        self.keyframe_request_after_s = (
            2 * segment_seconds if keyframe_request_after_s is None else keyframe_request_after_s
        )
        self.max_segment_s = 3 * segment_seconds
        self.stats = WriterStats()
        self.key = key
        self._on_segment = on_segment
        self._on_keyframe_needed = on_keyframe_needed
        self._clock = clock
        self._max_queue = max_queue
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"rec-{track_id}"
        )
        # push side (caller's thread)
        self._time_base: Fraction | None = None
        self._first_pts = 0
        self._last_pts: int | None = None
        self._seg_start: int | None = None
        self._seg_dims: tuple[int, int] | None = None
        self._need_keyframe = kind == "video"
        self._last_request: int | None = None
        self._overlong_warned = False
        # shared between threads, guarded by _lock
        self._lock = threading.Lock()
        self._queue: deque[_Item | None] = deque()
        self._draining = False
        self._batch_pending = False  # a BATCH_S timer will submit the drain
        self._closed = False
        self._close_future: Future[None] | None = None
        # worker side
        self._segment: _OpenSegment | None = None
        self._next_index = 0
        self._template: InputContainer | None = None

    # ------------------------------------------------------------ public API

    @property
    def offset_s(self) -> float | None:
        """Session time of the track's first packet (late joiners > 0); None before it."""
        if self.first_packet_wall is None:
            return None
        return round(self.first_packet_wall - self.session_start, 6)

    @property
    def time_base(self) -> Fraction | None:
        return self._time_base

    def push(self, packet: MediaPacket) -> bool:
        """Queue one packet; never blocks.  False when it was not accepted."""
        self.stats.received += 1
        if not self._accept_timing(packet):
            self.stats.rejected += 1
            return False
        cut = self._decide_cut(packet)
        if cut is None:
            return False
        with self._lock:
            if self._closed:
                self.stats.rejected += 1
                return False
            if len(self._queue) >= self._max_queue:
                self.stats.dropped_queue_full += 1
                overflow = True
            else:
                overflow = False
                self._queue.append(_Item(packet, cut))
                self._schedule_locked()
        if overflow:
            self._on_overflow(packet)
            return False
        self._last_pts = packet.pts
        return True

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush and close the open segment, wait for it; safe to call twice."""
        future = self._request_close()
        future.result(timeout)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.wrap_future(self._request_close())
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # ------------------------------------------------------------ push side

    def _accept_timing(self, packet: MediaPacket) -> bool:
        if packet.kind != self.kind:
            log.warning("%s: %s packet on a %s track", self.track_id, packet.kind, self.kind)
            return False
        if self._time_base is None:
            self._time_base = packet.time_base
            self._first_pts = packet.pts
            if self.first_packet_wall is None:
                self.first_packet_wall = self._clock()
        elif packet.time_base != self._time_base:
            log.warning("%s: time base changed to %s", self.track_id, packet.time_base)
            return False
        if self._last_pts is not None and packet.pts < self._last_pts:
            log.debug("%s: pts %d < %d, dropped", self.track_id, packet.pts, self._last_pts)
            return False
        return True

    def _ticks(self, seconds: float) -> int:
        assert self._time_base is not None
        return int(seconds / self._time_base)

    def _decide_cut(self, packet: MediaPacket) -> bool | None:
        """True: start a new segment with this packet; False: append; None: skip it."""
        if self.kind == "audio":
            if self._seg_start is None or (
                packet.pts - self._seg_start >= self._ticks(self.segment_seconds)
            ):
                self._seg_start = packet.pts
                return True
            return False
        if self._need_keyframe:
            if not packet.keyframe:
                self.stats.skipped_until_keyframe += 1
                self._request_keyframe(packet.pts)
                return None
            self._need_keyframe = False
            return self._start_video_segment(packet)
        assert self._seg_start is not None
        elapsed = packet.pts - self._seg_start
        if packet.keyframe:
            dims = vp8_dimensions(packet.data)
            changed = dims is not None and dims != self._seg_dims
            if elapsed >= self._ticks(self.segment_seconds) or changed:
                return self._start_video_segment(packet, dims)
            return False
        if elapsed >= self._ticks(self.keyframe_request_after_s):
            self._request_keyframe(packet.pts)
        if elapsed >= self._ticks(self.max_segment_s) and not self._overlong_warned:
            self._overlong_warned = True
            self.stats.overlong_segments += 1
            log.warning(
                "%s: no keyframe for %.1f s, segment grows past %.1f s",
                self.track_id,
                float(elapsed * self._time_base) if self._time_base else 0.0,
                self.max_segment_s,
            )
        return False

    def _start_video_segment(
        self, packet: MediaPacket, dims: tuple[int, int] | None = None
    ) -> bool:
        self._seg_start = packet.pts
        self._seg_dims = dims or vp8_dimensions(packet.data)
        self._last_request = None
        self._overlong_warned = False
        return True

    def _request_keyframe(self, pts: int) -> None:
        """Ask the publisher for a keyframe, at most once a second of track time."""
        if self._last_request is not None and pts - self._last_request < self._ticks(1.0):
            return
        self._last_request = pts
        self.stats.keyframe_requests += 1
        if self._on_keyframe_needed is not None:
            try:
                self._on_keyframe_needed()
            except Exception:
                log.exception("%s: on_keyframe_needed failed", self.track_id)

    def _on_overflow(self, packet: MediaPacket) -> None:
        """The worker is behind: the packet is lost; video resumes at the next keyframe."""
        if self.stats.dropped_queue_full == 1 or self.stats.dropped_queue_full % 100 == 0:
            log.warning(
                "%s: writer behind, %d packets dropped",
                self.track_id,
                self.stats.dropped_queue_full,
            )
        if self.kind == "video":
            self._need_keyframe = True
            self._request_keyframe(packet.pts)
        else:
            self._seg_start = None  # the next accepted packet starts a segment

    def _schedule_locked(self) -> None:
        """Have the worker drain the queue: now, or within BATCH_S on an event loop.

        Waking the worker for every packet makes it fight the event loop for the
        GIL hundreds of times a second; on the loop, packets are muxed in batches.
        """
        if self._draining:
            return
        if self._closed:  # closing: drain now, a pending timer may never fire
            self._batch_pending = False
            self._submit_locked()
            return
        if self._batch_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop (tests, tools): drain now
            self._submit_locked()
            return
        self._batch_pending = True
        loop.call_later(BATCH_S, self._batch_due)

    def _batch_due(self) -> None:
        with self._lock:
            self._batch_pending = False
            if self._queue and not self._draining:
                self._submit_locked()

    def _submit_locked(self) -> None:
        if self._draining:
            return
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # executor shut down under us
            log.error("%s: executor is shut down, packets are lost", self.track_id)
            self.stats.errors += 1
            if self._close_future is not None and not self._close_future.done():
                self._close_future.set_result(None)
            return
        self._draining = True

    def _request_close(self) -> Future[None]:
        with self._lock:
            if self._close_future is None:
                self._closed = True
                self._close_future = Future()
                self._queue.append(_CLOSE)
                self._schedule_locked()
            return self._close_future

    # ------------------------------------------------------------ worker side

    def _drain(self) -> None:
        started = time.thread_time()
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._draining = False
                        return
                    batch = list(self._queue)
                    self._queue.clear()
                for item in batch:
                    if item is _CLOSE:
                        self._finish_close()
                    else:
                        self._write(item)
        finally:
            self.stats.cpu_s += time.thread_time() - started

    def _write(self, item: _Item) -> None:
        packet = item.packet
        try:
            if item.cut or self._segment is None:
                if self._segment is not None:
                    self._finish_segment(end_pts=packet.pts)
                if self.kind == "video" and not packet.keyframe:
                    return  # a segment never starts mid-GOP; push() prevents this
                self._segment = self._open_segment(packet)
            self._append(self._segment, packet)
        except Exception:
            self.stats.errors += 1
            if self.stats.errors in (1, 10) or self.stats.errors % 1000 == 0:  # disk full: no flood
                log.exception(
                    "%s: muxing failed (%d errors), segment abandoned",
                    self.track_id,
                    self.stats.errors,
                )
            self._abandon_segment()

    def _open_segment(self, packet: MediaPacket) -> _OpenSegment:
        index = self._next_index
        final = self.directory / segment_relpath(self.track_id, index)
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + PARTIAL_SUFFIX)
        buffer = io.BytesIO() if self.key is not None else None
        container = av.open(buffer if buffer is not None else str(part), "w", format="webm")
        try:
            stream = self._add_stream(container, packet)
        except Exception:
            container.close()
            raise
        self._next_index += (
            1  # a failed open reuses the index; an abandoned segment keeps its .part
        )
        return _OpenSegment(index, part, container, stream, start_pts=packet.pts, buffer=buffer)

    def _add_stream(self, container: OutputContainer, packet: MediaPacket) -> Stream:
        if self.kind == "video":
            width, height = vp8_dimensions(packet.data) or (0, 0)
            return container.add_mux_stream("vp8", width=width, height=height)
        if self._template is None:
            self._template = _opus_template()
        return container.add_stream_from_template(self._template.streams.audio[0])

    def _append(self, seg: _OpenSegment, packet: MediaPacket) -> None:
        """Mux the previous packet now that its duration is known; hold this one."""
        if seg.pending is not None:
            interval = packet.pts - seg.pending.pts
            if interval > 0:
                seg.last_interval = interval
            self._mux(seg, seg.pending, self._packet_duration(seg.pending, interval))
        seg.pending = packet

    def _packet_duration(self, packet: MediaPacket, interval: int | None) -> int:
        if self.kind == "audio":
            samples = opus_packet_samples(packet.data)
            if samples is not None:
                return int(Fraction(samples, 48000) / packet.time_base)
        if interval is not None and interval > 0:
            return interval
        return 0

    def _mux(self, seg: _OpenSegment, packet: MediaPacket, duration: int) -> None:
        av_packet = av.Packet(packet.data)
        pts = packet.pts - self._first_pts
        av_packet.pts = pts
        av_packet.dts = pts
        av_packet.time_base = packet.time_base
        if duration > 0:
            av_packet.duration = duration
        av_packet.is_keyframe = packet.keyframe or self.kind == "audio"
        av_packet.stream = seg.stream
        seg.container.mux(av_packet)
        seg.packets += 1
        self.stats.written += 1

    def _finish_segment(self, end_pts: int | None) -> None:
        seg = self._segment
        if seg is None:
            return
        last = seg.pending
        if last is not None:
            interval = end_pts - last.pts if end_pts is not None else None
            duration = self._packet_duration(last, interval)
            if duration <= 0 and self.kind == "video":
                duration = seg.last_interval
            self._mux(seg, last, duration)
            if end_pts is None:
                end_pts = last.pts + duration
        seg.container.close()
        self._segment = None
        if seg.packets == 0 or end_pts is None:
            seg.part_path.unlink(missing_ok=True)
            return
        info = self._seal_file(seg, end_pts)
        self.stats.segments += 1
        if self._on_segment is not None:
            try:
                self._on_segment(info)
            except Exception:
                self.stats.errors += 1
                log.exception("%s: on_segment failed for %d", self.track_id, info.index)

    def _seal_file(self, seg: _OpenSegment, end_pts: int) -> SegmentInfo:
        """fsync, hash, rename ``.part`` → ``.webm``, fsync the directory.

        Encrypted: the muxed bytes in memory are encrypted and written to ``.part`` first.
        """
        digest = hashlib.sha256()
        size = 0
        if seg.buffer is not None:
            assert self.key is not None
            sealed = encrypt_bytes(seg.buffer.getbuffer(), self.key)
            seg.buffer = None
            _write_synced(seg.part_path, sealed)
            digest.update(sealed)
            size = len(sealed)
        else:
            with open(seg.part_path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(f.fileno())
        relpath = segment_relpath(self.track_id, seg.index)
        os.replace(seg.part_path, self.directory / relpath)
        _fsync_dir(seg.part_path.parent)
        tb = self._time_base or Fraction(1)
        return SegmentInfo(
            track_id=self.track_id,
            index=seg.index,
            path=relpath,
            start_pts_s=round(float((seg.start_pts - self._first_pts) * tb), 6),
            duration_s=round(float((end_pts - seg.start_pts) * tb), 6),
            sha256=digest.hexdigest(),
            size=size,
            packets=seg.packets,
        )

    def _abandon_segment(self) -> None:
        seg = self._segment
        self._segment = None
        if seg is None:
            return
        try:
            seg.container.close()
        except Exception:
            log.debug("%s: close after failure also failed", self.track_id)
        if self.kind == "video":
            self._need_keyframe = True  # read by push() next time: resume on a keyframe

    def _finish_close(self) -> None:
        try:
            self._finish_segment(end_pts=None)
        except Exception:
            self.stats.errors += 1
            log.exception("%s: final segment failed", self.track_id)
            self._abandon_segment()
        finally:
            if self._template is not None:
                self._template.close()
                self._template = None
            assert self._close_future is not None
            if not self._close_future.done():
                self._close_future.set_result(None)
            log.info(
                "%s: closed, %d segments, %d packets written, %d dropped",
                self.track_id,
                self.stats.segments,
                self.stats.written,
                self.stats.dropped_queue_full,
            )


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
