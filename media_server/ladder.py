"""Ladder: lower-quality copies (rungs) of one published video, made on the server.

aiortc cannot receive simulcast, so a weak subscriber's lower quality is made
here: the original VP8 stream is decoded once and each *active* rung is
encoded once, shared by every subscriber on that rung.  Good subscribers keep
the original packets untouched.

Rungs
-----
A :class:`Rung` is a pixel budget (``width x height``, the original's aspect
ratio is kept and it is never upscaled), a frame rate (lower rates drop
frames) and a CBR bitrate.  :data:`DEFAULT_RUNGS` are about 1.45x apart: aiortc
cannot probe, and a receiver's REMB never exceeds 1.5x what it receives
(+10 kbit/s, libwebrtc's and aiortc's ``AimdRateControl``), so a rung further
than ~1.5x above the current one could never be reached by a clean link.
:func:`usable_rungs` picks the ones that make sense below a given original.

Encoding
--------
PyAV's libvpx encoder driven directly (aiortc's own encoder clamps VP8 to
250 kbit/s-1.5 Mbit/s and rebuilds itself on every bitrate change): realtime
deadline, ``cpu-used`` 8, error resilient, no lag, CBR at the rung's bitrate
with a 1 s buffer and keyframes capped at 3x an average frame, no automatic
keyframes.  A rung's first frame is a keyframe; later ones come on demand
(:meth:`Ladder.request_keyframe`), at most one per ``keyframe_interval_s`` of
stream time.  Output packets carry the original frame's pts rescaled to
90 kHz: for an RTP-timestamped source they are the original's timestamps,
so original and rungs share one timeline.

Threads
-------
All decoding, scaling and encoding runs off the event loop: in one private
worker thread per Ladder, or in a shared executor passed in (work for one
Ladder is still serialized).  :meth:`Ladder.push` never blocks: it appends to a
small bounded queue; when the worker falls behind the queue is flushed and the
ladder waits for the next keyframe of the original (and asks for one through
``request_source_keyframe``).  That callback is only ever called from the
thread calling ``push`` / ``acquire`` (the event loop), never from the worker:
a decode error the worker meets becomes a request at the next ``push``.  With
``loop`` given, sinks are called on that event loop (``call_soon_threadsafe``);
without it, on the worker thread.

Cost (this machine, 640x360 test card, one thread): decode 0.5 ms a frame;
scale + encode 3.0 ms (360p@30), 2.2 (288p@30), 1.8 (240p@15), 1.2 (180p@15),
0.8 (144p@15), 0.5 (90p@10) per output frame.  With the clip the benchmarks
send, every rung's output is within 2 % of its bitrate.

Lifecycle
---------
``acquire(rung)`` / ``release(rung)`` count users; a rung encodes only while
acquired, and the decoder runs only while some rung is.  ``attach(rung, sink)``
/ ``detach(rung, sink)`` register who receives a rung's packets (a sink has
``push(packet)``); attaching does not acquire.  Once a rung is released, none
of its packets reach a sink any more, even those already in flight.
To bind a DownTrack to a rung, wrap ``(ladder, rung)`` in an object with a
Forwarder's ``attach`` / ``detach`` / ``request_keyframe``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import av
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType
from av.video.reformatter import Interpolation, VideoReformatter

from .packet import VIDEO_TIME_BASE, MediaPacket, is_vp8_keyframe

logger = logging.getLogger(__name__)

CLOCK_RATE = 90000
QUEUE_PACKETS = 8
KEYFRAME_INTERVAL_S = 0.5
DECIMATION_TOLERANCE = 0.3  # of the rung's frame interval: absorbs capture jitter
_RTP_WRAP = 1 << 32


@dataclass(frozen=True, slots=True)
class Rung:
    """One lower quality: a pixel budget, a frame rate and a CBR bitrate."""

    name: str
    width: int
    height: int
    fps: int
    bitrate: int

    def size_for(self, src_width: int, src_height: int) -> tuple[int, int]:
        """Output size for a source: same pixel count as the rung, source aspect, no upscale."""
        scale = min(1.0, math.sqrt(self.width * self.height / (src_width * src_height)))
        return _even(src_width * scale), _even(src_height * scale)


DEFAULT_RUNGS: tuple[Rung, ...] = (
    Rung("720p", 1280, 720, 30, 1_200_000),
    Rung("540p", 960, 540, 30, 850_000),
    Rung("432p", 768, 432, 30, 580_000),
    Rung("360p", 640, 360, 30, 400_000),
    Rung("288p", 512, 288, 30, 280_000),
    Rung("240p", 426, 240, 15, 190_000),
    Rung("180p", 320, 180, 15, 130_000),
    Rung("144p", 256, 144, 15, 90_000),
    Rung("120p", 214, 120, 12, 65_000),
    # the rung a lossy satellite link gets twice (repeat.py): 2 x 50 kbit/s on the wire
    Rung("90p", 160, 90, 10, 45_000),
)


RUNG_MAX_FRACTION = 0.8  # a rung is offered when it costs at most this share of the original


def usable_rungs(
    width: int,
    height: int,
    original_bps: int,
    rungs: Sequence[Rung] = DEFAULT_RUNGS,
    max_fraction: float = RUNG_MAX_FRACTION,
    keep: str | None = None,
) -> tuple[Rung, ...]:
    """Rungs worth offering below an original: cheaper by 20 % and not larger.

    ``keep``: a rung a viewer is on, offered whenever it is not larger, even if
    the original's measured rate dipped (between two keyframes) below what it
    takes to offer it afresh.
    """
    return tuple(
        r
        for r in rungs
        if r.width * r.height <= width * height
        and (r.name == keep or r.bitrate <= original_bps * max_fraction)
    )


class RungSink(Protocol):
    def push(self, item: Any) -> None: ...


@dataclass(slots=True)
class RungStats:
    frames: int = 0
    bytes: int = 0
    keyframes: int = 0
    encode_s: float = 0.0  # thread CPU time spent scaling and encoding this rung
    width: int = 0
    height: int = 0

    @property
    def encode_ms_per_frame(self) -> float:
        return 1000 * self.encode_s / self.frames if self.frames else 0.0


@dataclass(frozen=True, slots=True)
class LadderStats:
    packets_in: int
    packets_dropped: int  # queue overflows and waiting for a source keyframe
    frames_decoded: int
    decode_errors: int
    decode_s: float
    cpu_s: float  # all worker CPU time of this ladder (time.thread_time)
    rungs: dict[str, RungStats]


@dataclass(eq=False, slots=True)
class _Run:
    """One acquisition of a rung (a new one after each full release)."""

    rung: Rung
    refs: int = 1
    keyframe_requested: bool = False  # under the ladder's lock
    # worker-only state
    encoder: VideoCodecContext | None = None
    reformatter: VideoReformatter = field(default_factory=VideoReformatter)
    size: tuple[int, int] = (0, 0)
    next_due: float | None = None
    last_keyframe: int | None = None
    pending_pts: dict[int, int] = field(default_factory=dict)
    stats: RungStats = field(default_factory=RungStats)


class Ladder:
    """Decode one published VP8 track once, encode each active rung once."""

    def __init__(
        self,
        track_id: str,
        rungs: Sequence[Rung] = DEFAULT_RUNGS,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        executor: Executor | None = None,
        request_source_keyframe: Callable[[], None] | None = None,
        queue_packets: int = QUEUE_PACKETS,
        keyframe_interval_s: float = KEYFRAME_INTERVAL_S,
    ) -> None:
        names = [r.name for r in rungs]
        if len(set(names)) != len(names):
            raise ValueError("rung names must be unique")
        self.track_id = track_id
        self.rungs = {r.name: r for r in rungs}
        self._loop = loop
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"ladder-{track_id}"
        )
        self._request_source_keyframe = request_source_keyframe
        self._capacity = max(1, queue_packets)
        self._keyframe_ticks = round(keyframe_interval_s * CLOCK_RATE)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        # shared state, under _lock
        self._queue: deque[MediaPacket] = deque()
        self._runs: dict[str, _Run] = {}
        self._stopped: list[_Run] = []  # released runs whose encoders the worker frees
        self._sinks: dict[str, list[RungSink]] = {}
        self._scheduled = False
        self._await_key = True
        self._want_source_key = False
        self._epoch = 0  # bumped when the ladder goes idle: the worker resets its decoder
        self._closed = False
        self._packets_in = 0
        self._dropped = 0
        # worker-only state
        self._decoder: VideoCodecContext | None = None
        self._decoder_epoch = -1
        self._last_ext: int | None = None
        self._frames_decoded = 0
        self._decode_errors = 0
        self._decode_s = 0.0
        self._cpu_s = 0.0
        self._retired: dict[str, RungStats] = {}

    def __repr__(self) -> str:
        return f"Ladder({self.track_id})"

    # -- lifecycle (event-loop thread) ----------------------------------------

    def acquire(self, rung: str) -> None:
        """One more user of ``rung``; it starts encoding with a keyframe if it was idle."""
        self._rung(rung)
        with self._lock:
            if self._closed:
                return
            run = self._runs.get(rung)
            if run is not None:
                run.refs += 1
                return
            starting = not self._runs
            self._runs[rung] = _Run(self.rungs[rung])
            if starting:
                self._await_key = True
        logger.info("%r: rung %s started", self, rung)
        if starting:
            self._ask_source_keyframe()

    def release(self, rung: str) -> None:
        """One user less; the rung stops when none is left, the decoder when no rung is."""
        self._rung(rung)
        with self._lock:
            run = self._runs.get(rung)
            if run is None:
                return
            run.refs -= 1
            if run.refs > 0:
                return
            del self._runs[rung]
            self._stopped.append(run)
            if not self._runs:
                self._dropped += len(self._queue)
                self._queue.clear()
                self._epoch += 1
            submit = not self._scheduled
            self._scheduled = True
        logger.info("%r: rung %s stopped", self, rung)
        if submit:
            self._submit()  # let the worker free the encoder (and the decoder)

    def attach(self, rung: str, sink: RungSink) -> None:
        """``sink.push(packet)`` receives ``rung``'s packets while it is acquired."""
        self._rung(rung)
        with self._lock:
            sinks = self._sinks.setdefault(rung, [])
            if sink not in sinks:
                sinks.append(sink)

    def detach(self, rung: str, sink: RungSink) -> None:
        with self._lock:
            sinks = self._sinks.get(rung, [])
            if sink in sinks:
                sinks.remove(sink)

    def request_keyframe(self, rung: str) -> None:
        """Make ``rung``'s next frame a keyframe (at most one per keyframe interval)."""
        with self._lock:
            run = self._runs.get(rung)
            if run is not None:
                run.keyframe_requested = True

    def active_rungs(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    @property
    def active(self) -> bool:
        with self._lock:
            return bool(self._runs)

    def close(self) -> None:
        """Stop everything; safe to call twice.  Does not wait for the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._stopped.extend(self._runs.values())
            self._runs.clear()
            self._sinks.clear()
            submit = not self._scheduled
            self._scheduled = True
        if submit:
            self._submit()
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # -- input (event-loop thread) ----------------------------------------------

    def push(self, packet: MediaPacket) -> None:
        """Offer one packet of the original; never blocks, a no-op while no rung is active."""
        ask = schedule = False
        with self._lock:
            if self._closed or not self._runs or packet.kind != "video":
                return
            self._packets_in += 1
            ask, self._want_source_key = self._want_source_key, False
            if packet.keyframe:
                self._await_key = False
            if len(self._queue) >= self._capacity:
                # behind: what is queued is useless without its predecessors
                self._dropped += len(self._queue)
                self._queue.clear()
                if not packet.keyframe:
                    self._await_key = ask = True
            if self._await_key:
                self._dropped += 1
            else:
                self._queue.append(packet)
                schedule = not self._scheduled
                self._scheduled = True
        if ask:
            logger.info("%r: behind or broken, waiting for a keyframe", self)
            self._ask_source_keyframe()
        if schedule:
            self._submit()

    # -- observation (any thread) ---------------------------------------------

    def wait_idle(self, timeout: float) -> bool:
        """Block until the worker has processed everything queued (tests, benchmarks)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._scheduled, timeout)

    def stats(self) -> LadderStats:
        with self._lock:
            runs = dict(self._runs)
            packets_in, dropped = self._packets_in, self._dropped
            rungs = {name: _merge(None, s) for name, s in self._retired.items()}
            for run in self._stopped:
                rungs[run.rung.name] = _merge(rungs.get(run.rung.name), run.stats)
        for name, run in runs.items():
            rungs[name] = _merge(rungs.get(name), run.stats)
        return LadderStats(
            packets_in=packets_in,
            packets_dropped=dropped,
            frames_decoded=self._frames_decoded,
            decode_errors=self._decode_errors,
            decode_s=self._decode_s,
            cpu_s=self._cpu_s,
            rungs=rungs,
        )

    # -- worker ----------------------------------------------------------------

    def _submit(self) -> None:
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # executor shut down
            with self._idle:
                self._scheduled = False
                self._idle.notify_all()

    def _drain(self) -> None:
        started = time.thread_time()
        try:
            while True:
                with self._idle:
                    self._retire()
                    if self._closed or not self._runs:
                        self._decoder = None
                    if self._closed or not self._queue:
                        self._scheduled = False
                        self._idle.notify_all()
                        return
                    packet = self._queue.popleft()
                    runs = list(self._runs.values())
                    epoch = self._epoch
                self._process(packet, runs, epoch)
        except Exception:
            logger.exception("%r: worker failed", self)
            with self._idle:
                self._queue.clear()
                self._await_key = self._want_source_key = True
                self._scheduled = False
                self._idle.notify_all()
        finally:
            self._cpu_s += time.thread_time() - started

    def _retire(self) -> None:
        """Free the encoders of released rungs, keep their counters (lock held)."""
        for run in self._stopped:
            run.encoder = None
            self._retired[run.rung.name] = _merge(self._retired.get(run.rung.name), run.stats)
        self._stopped.clear()

    def _process(self, packet: MediaPacket, runs: list[_Run], epoch: int) -> None:
        if self._decoder is None or epoch != self._decoder_epoch:
            # FFmpeg's own VP8 decoder: ~20 % cheaper than libvpx's here (0.6 vs 0.8 ms
            # a 360p frame) and it decodes the same bitstream
            self._decoder = av.CodecContext.create("vp8", "r")
            self._decoder.thread_count = 1
            self._decoder_epoch = epoch
            self._last_ext = None
        ext = self._extend(packet)
        source = av.Packet(packet.data)
        source.pts = ext
        source.time_base = VIDEO_TIME_BASE
        started = time.thread_time()
        try:
            frames = self._decoder.decode(source)
        except av.FFmpegError as exc:
            self._decode_errors += 1
            logger.info("%r: decode error (%s), waiting for a keyframe", self, exc)
            with self._lock:
                self._dropped += len(self._queue)
                self._queue.clear()
                self._await_key = self._want_source_key = True
            return
        finally:
            self._decode_s += time.thread_time() - started
        out_pts = round(packet.pts * packet.time_base * CLOCK_RATE)
        for frame in frames:
            self._frames_decoded += 1
            scaled: dict[tuple[int, int], av.VideoFrame] = {}
            for run in runs:
                self._encode(run, frame, ext, out_pts, scaled)

    def _extend(self, packet: MediaPacket) -> int:
        """Source pts in 90 kHz ticks, unwrapped (RTP timestamps wrap at 2**32)."""
        pts = round(packet.pts * packet.time_base * CLOCK_RATE)
        if self._last_ext is not None:
            delta = (pts - self._last_ext) % _RTP_WRAP
            if delta >= _RTP_WRAP // 2:
                delta -= _RTP_WRAP
            pts = self._last_ext + delta
        self._last_ext = pts
        return pts

    def _encode(
        self,
        run: _Run,
        frame: av.VideoFrame,
        ext: int,
        out_pts: int,
        scaled: dict[tuple[int, int], av.VideoFrame],
    ) -> None:
        rung = run.rung
        interval = CLOCK_RATE / rung.fps
        if run.next_due is not None and ext < run.next_due - DECIMATION_TOLERANCE * interval:
            return  # frame-rate reduction
        due = ext + interval if run.next_due is None else run.next_due + interval
        run.next_due = due if due > ext else ext + interval
        started = time.thread_time()
        try:
            encoded = self._encode_frame(run, frame, ext, out_pts, scaled)
        finally:
            run.stats.encode_s += time.thread_time() - started
        for item in encoded:
            data = bytes(item)
            pts = out_pts if item.pts is None else run.pending_pts.pop(item.pts, out_pts)
            keyframe = is_vp8_keyframe(data)
            if keyframe:
                run.last_keyframe = ext
                run.stats.keyframes += 1
            run.stats.frames += 1
            run.stats.bytes += len(data)
            self._emit(run, MediaPacket(data, pts, VIDEO_TIME_BASE, keyframe, "video"))
        if len(run.pending_pts) > 4:  # frames the encoder dropped
            for key in sorted(run.pending_pts)[:-1]:
                del run.pending_pts[key]

    def _encode_frame(
        self,
        run: _Run,
        frame: av.VideoFrame,
        ext: int,
        out_pts: int,
        scaled: dict[tuple[int, int], av.VideoFrame],
    ) -> list[av.Packet[Any]]:
        size = run.rung.size_for(frame.width, frame.height)
        if run.encoder is None or run.size != size:
            run.encoder = _make_encoder(run.rung, size)
            run.size = size
            run.stats.width, run.stats.height = size
            run.last_keyframe = None
            run.pending_pts.clear()
        picture = scaled.get(size)
        if picture is None:
            picture = _scale(run.reformatter, frame, size)
            scaled[size] = picture
        picture.pts = ext
        picture.time_base = VIDEO_TIME_BASE
        with self._lock:
            force = run.keyframe_requested and (
                run.last_keyframe is None or ext - run.last_keyframe >= self._keyframe_ticks
            )
            if force:
                run.keyframe_requested = False
        picture.pict_type = PictureType.I if force else PictureType.NONE
        run.pending_pts[ext] = out_pts
        try:
            return run.encoder.encode(picture)
        except av.FFmpegError as exc:
            logger.warning("%r: %s encoder failed (%s), restarting it", self, run.rung.name, exc)
            run.encoder = None
            return []
        finally:
            picture.pict_type = PictureType.NONE  # the picture may be shared with other rungs

    def _emit(self, run: _Run, packet: MediaPacket) -> None:
        if self._loop is None:
            self._deliver(run, packet)
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, run, packet)
        except RuntimeError:  # loop closed
            pass

    def _deliver(self, run: _Run, packet: MediaPacket) -> None:
        with self._lock:
            if self._runs.get(run.rung.name) is not run:
                return  # released meanwhile
            sinks = tuple(self._sinks.get(run.rung.name, ()))
        for sink in sinks:
            try:
                sink.push(packet)
            except Exception:
                logger.exception("%r: sink of %s failed", self, run.rung.name)

    # -- helpers ----------------------------------------------------------------

    def _rung(self, name: str) -> Rung:
        rung = self.rungs.get(name)
        if rung is None:
            raise KeyError(f"{self!r} has no rung {name!r}")
        return rung

    def _ask_source_keyframe(self) -> None:
        if self._request_source_keyframe is not None:
            self._request_source_keyframe()


def _even(value: float) -> int:
    return max(2, 2 * round(value / 2))


def _make_encoder(rung: Rung, size: tuple[int, int]) -> VideoCodecContext:
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = size
    codec.pix_fmt = "yuv420p"
    codec.time_base = Fraction(1, CLOCK_RATE)
    codec.framerate = Fraction(rung.fps)
    codec.bit_rate = rung.bitrate
    codec.gop_size = 1 << 20  # keyframes only on demand
    codec.qmin = 4
    codec.qmax = 56
    codec.thread_count = 1
    rate = str(rung.bitrate)
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "8",
        "lag-in-frames": "0",
        "error-resilient": "1",
        "auto-alt-ref": "0",
        # minrate == maxrate == bit_rate: CBR, as a WebRTC sender; 1 s buffer
        "minrate": rate,
        "maxrate": rate,
        "bufsize": rate,
        "undershoot-pct": "100",
        "overshoot-pct": "15",
        # a keyframe at most ~3 average frames: no long stall on a thin link
        "max-intra-rate": "300",
    }
    return codec


def _scale(
    reformatter: VideoReformatter, frame: av.VideoFrame, size: tuple[int, int]
) -> av.VideoFrame:
    if (frame.width, frame.height) == size and frame.format.name == "yuv420p":
        return frame
    width, height = size
    return reformatter.reformat(
        frame, width, height, "yuv420p", interpolation=Interpolation.AREA, threads=1
    )


def _merge(a: RungStats | None, b: RungStats) -> RungStats:
    a = a or RungStats()
    return RungStats(
        frames=a.frames + b.frames,
        bytes=a.bytes + b.bytes,
        keyframes=a.keyframes + b.keyframes,
        encode_s=a.encode_s + b.encode_s,
        width=b.width or a.width,
        height=b.height or a.height,
    )
