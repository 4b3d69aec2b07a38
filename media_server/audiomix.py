"""AudioMixer: one Opus stream carrying several publishers' voices, for a thin link.

Every Opus stream costs ~66 B of RTP/SRTP/UDP/IP headers per packet, 50 packets
a second: five publishers at 32 kbit/s take ~280 kbit/s on the wire, more than a
satellite link and four times an EDGE link.  A viewer whose estimate cannot
carry the originals gets one *mix* of the publishers it watches instead, on one
of its existing audio transceivers (the others carry nothing): one stream, with
longer frames on slow links (a 60 ms frame pays the headers once for three).

Sharing
-------
Like a :class:`~media_server.ladder.Ladder`, the work is done once and shared:
each publisher's audio (an *input*) is decoded once while some mix uses it,
and each :class:`Mix` — a distinct set of inputs and a :class:`MixFormat` — is
mixed and encoded once for every viewer that receives it.  Inputs are fed by
attaching a sink to the published track's Forwarder on the first mix that uses
them and detaching it when the last one is released; the mixer's worker thread
runs only while some mix exists.

Clock
-----
The worker keeps a timeline of 48 kHz samples driven by the wall clock and
steps it every 20 ms (a *tick*).  Each input's packets are decoded and laid on
it by their RTP timestamps, 40 ms after arrival
(:class:`~media_server.mixinput.InputTimeline`): jitter is absorbed, and a lost
or late packet is silence for that input (the mix never waits for anyone).  At
each tick, every mix whose frame ends there sums its inputs (a limiter keeps
peaks in range) and encodes one frame.  Added latency: the jitter delay plus
the frame's length beyond the originals' 20 ms (60 ms for 40 ms frames).  A
worker that falls more than ``MAX_BEHIND_S`` behind skips ahead.

Encoding: PyAV's libopus, mono, hard CBR at the format's bitrate (the wire rate
is then known in advance), ``application=voip``, ``frame_duration`` 40 or 60 ms
(RFC 7587: the RTP timestamp advances by the frame's samples; Chromium's NetEq
and aiortc decode any Opus frame length up to 120 ms with opus/48000/2).
Output packets are :class:`~media_server.packet.MediaPacket` objects whose pts
is the frame's position on the mixer's timeline; a DownTrack rebases it when it
is bound.

Threads: :meth:`AudioMixer.acquire`, :meth:`AudioMixer.release` and the input
sinks are called on the event loop; decoding, mixing and encoding run on the
mixer's worker thread (PyAV releases the GIL); packets are delivered on the
loop (``call_soon_threadsafe``).  With ``threaded=False`` nothing runs by
itself and :meth:`AudioMixer.advance` does the worker's job (tests).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext

from .mixinput import MAX_FRAME_SAMPLES, SAMPLE_RATE, InputTimeline
from .packet import AUDIO_TIME_BASE, MediaPacket, wire_bps

logger = logging.getLogger(__name__)

TICK_SAMPLES = 960  # the mixing clock's step: 20 ms
TICK_S = TICK_SAMPLES / SAMPLE_RATE
MAX_BEHIND_S = 0.3  # a worker this far behind its clock skips ahead
QUEUE_PACKETS = 1000  # inputs' packets waiting for the worker (~4 s of 5 publishers)
LIMIT = 30000  # peak of the mixed signal (int16); louder frames are scaled down


@dataclass(frozen=True, slots=True)
class MixFormat:
    """How a mix is encoded: a CBR bitrate and a frame length."""

    name: str
    bitrate: int
    frame_ms: int  # 20, 40 or 60

    def __post_init__(self) -> None:
        if self.frame_ms not in (20, 40, 60) or self.frame_samples > MAX_FRAME_SAMPLES:
            raise ValueError("frame_ms must be 20, 40 or 60")

    @property
    def frame_samples(self) -> int:
        return SAMPLE_RATE * self.frame_ms // 1000

    @property
    def wire_bps(self) -> int:
        """One copy's rate on the wire, headers included."""
        return wire_bps(self.bitrate, 1000 / self.frame_ms)


# best first; wire rates 45, 37, 25 and 21 kbit/s (a 20 ms original: ~56)
MIX_FORMATS: tuple[MixFormat, ...] = (
    MixFormat("32k/40ms", 32_000, 40),
    MixFormat("24k/40ms", 24_000, 40),
    MixFormat("16k/60ms", 16_000, 60),
    MixFormat("12k/60ms", 12_000, 60),
)


class MixInput(Protocol):
    """Where an input's packets come from (a Forwarder)."""

    def attach(self, sink: Any) -> None: ...

    def detach(self, sink: Any) -> None: ...


class PacketSink(Protocol):
    def push(self, item: Any) -> None: ...


@dataclass(slots=True)
class MixStats:
    frames: int = 0
    bytes: int = 0
    encode_s: float = 0.0
    silent_inputs: int = 0  # (frame, input) pairs for which the input had nothing


InputKey = tuple[str, int]  # (track id, id of its source): a re-published track is new


class Mix:
    """One mixed stream: a set of inputs and a format, encoded once for its viewers.

    A DownTrack source (``attach`` / ``detach`` / ``request_keyframe``), usually
    through a :class:`MixSource`.
    """

    def __init__(self, mixer: AudioMixer, inputs: frozenset[InputKey], fmt: MixFormat) -> None:
        self.mixer = mixer
        self.input_keys = inputs
        self.inputs = frozenset(track_id for track_id, _ in inputs)  # track ids
        self.format = fmt
        self.refs = 0
        self.stats = MixStats()
        self._sinks: list[PacketSink] = []
        # worker-only state
        self.start_position: int | None = None  # frames end after this timeline position
        self.encoder: AudioCodecContext | None = None
        self.positions: deque[int] = deque()  # frames given to the encoder, not yet out
        self.gain = 1.0

    def __repr__(self) -> str:
        return f"Mix({'+'.join(sorted(self.inputs))} @ {self.format.name})"

    @property
    def key(self) -> tuple[frozenset[InputKey], MixFormat]:
        return (self.input_keys, self.format)

    def attach(self, sink: PacketSink) -> None:
        if sink not in self._sinks:
            self._sinks.append(sink)

    def detach(self, sink: PacketSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def request_keyframe(self) -> None:
        """Audio frames are all independently decodable: nothing to do."""

    def deliver(self, packet: MediaPacket) -> None:
        for sink in tuple(self._sinks):
            try:
                sink.push(packet)
            except Exception:
                logger.exception("%r: sink failed", self)


class _Feed:
    """The sink an input's Forwarder pushes to (event loop): stamps arrival, queues."""

    def __init__(self, mixer: AudioMixer, key: InputKey) -> None:
        self.mixer = mixer
        self.key = key

    def push(self, item: Any) -> None:
        if isinstance(item, MediaPacket) and item.kind == "audio":
            self.mixer.offer(self.key, item)


@dataclass(eq=False, slots=True)
class _Input:
    """One publisher's audio, decoded once for every mix that uses it."""

    track_id: str
    source: MixInput
    feed: _Feed
    timeline: InputTimeline
    refs: int = 0


class AudioMixer:
    """The room's audio mixes: decode each input once, mix and encode each Mix once."""

    def __init__(
        self,
        name: str = "mixer",
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,
    ) -> None:
        self.name = name
        self._loop = loop
        self._clock = clock
        self._threaded = threaded
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # shared state, under _lock
        self._mixes: dict[tuple[frozenset[InputKey], MixFormat], Mix] = {}
        self._inputs: dict[InputKey, _Input] = {}
        self._queue: deque[tuple[InputKey, MediaPacket, float]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._dropped = 0  # queue overflows
        # worker-only state
        self._t0: float | None = None
        self._position = 0  # the timeline is mixed up to here (a multiple of TICK_SAMPLES)
        self._cpu_s = 0.0
        self._skips = 0
        self._retired = MixStats()

    def __repr__(self) -> str:
        return f"AudioMixer({self.name})"

    # -- lifecycle (event-loop thread) ----------------------------------------

    def acquire(self, inputs: Mapping[str, MixInput], fmt: MixFormat) -> Mix:
        """One more viewer of the mix of ``inputs`` in ``fmt``; starts what it needs."""
        if len(inputs) < 1:
            raise ValueError("a mix needs at least one input")
        if self._loop is None and self._threaded:
            self._loop = asyncio.get_running_loop()
        keys = {(track_id, id(source)): source for track_id, source in inputs.items()}
        key = (frozenset(keys), fmt)
        attach: list[_Input] = []
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            mix = self._mixes.get(key)
            if mix is None:
                mix = Mix(self, key[0], fmt)
                self._mixes[key] = mix
                for input_key, source in keys.items():
                    inp = self._inputs.get(input_key)
                    if inp is None:
                        feed = _Feed(self, input_key)
                        inp = _Input(input_key[0], source, feed, InputTimeline(input_key[0]))
                        self._inputs[input_key] = inp
                        attach.append(inp)
                    inp.refs += 1
                logger.info("%r: %r started", self, mix)
            mix.refs += 1
            start = self._threaded and self._thread is None
            if start:
                self._thread = threading.Thread(
                    target=self._run, name=f"audiomix-{self.name}", daemon=True
                )
        for inp in attach:
            inp.source.attach(inp.feed)
        if start:
            assert self._thread is not None
            self._thread.start()
        return mix

    def release(self, mix: Mix) -> None:
        """One viewer less; the mix stops with its last viewer, an input with its last mix."""
        detach: list[_Input] = []
        with self._lock:
            if self._mixes.get(mix.key) is not mix or mix.refs <= 0:
                return
            mix.refs -= 1
            if mix.refs > 0:
                return
            del self._mixes[mix.key]
            _merge_into(self._retired, mix.stats)
            for input_key in mix.input_keys:
                inp = self._inputs.get(input_key)
                if inp is None:
                    continue
                inp.refs -= 1
                if inp.refs <= 0:
                    del self._inputs[input_key]
                    detach.append(inp)
            if not self._inputs:
                self._queue.clear()
            self._wake.notify_all()
        logger.info("%r: %r stopped", self, mix)
        for inp in detach:
            inp.source.detach(inp.feed)

    def offer(self, key: InputKey, packet: MediaPacket) -> None:
        """An input's packet (event loop); never blocks."""
        now = self._clock()
        with self._lock:
            if key not in self._inputs:
                return
            if len(self._queue) >= QUEUE_PACKETS:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append((key, packet, now))

    @property
    def active(self) -> bool:
        with self._lock:
            return bool(self._mixes)

    def input_ids(self) -> set[str]:
        """Track ids of the inputs being decoded."""
        with self._lock:
            return {track_id for track_id, _ in self._inputs}

    def close(self) -> None:
        """Stop every mix and input; safe to call twice.  Does not wait for the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inputs = list(self._inputs.values())
            self._mixes.clear()
            self._inputs.clear()
            self._queue.clear()
            self._wake.notify_all()
        for inp in inputs:
            inp.source.detach(inp.feed)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            mixes = list(self._mixes.values())
            inputs = list(self._inputs.values())
            dropped = self._dropped
        return {
            "mixes": [
                {
                    "inputs": sorted(m.inputs),
                    "format": m.format.name,
                    "viewers": m.refs,
                    "frames": m.stats.frames,
                    "bytes": m.stats.bytes,
                    "silent_inputs": m.stats.silent_inputs,
                }
                for m in mixes
            ],
            "inputs": {
                i.track_id: {
                    "packets": i.timeline.packets,
                    "late": i.timeline.late,
                    "resyncs": i.timeline.resyncs,
                    "decode_errors": i.timeline.decode_errors,
                }
                for i in inputs
            },
            "queue_dropped": dropped,
            "skips": self._skips,
            "cpu_s": round(self._cpu_s, 3),
        }

    # -- worker ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._mixes:
                    self._thread = None
                    return
            try:
                self.advance(self._clock())
            except Exception:
                logger.exception("%r: worker step failed", self)
            assert self._t0 is not None
            next_at = self._t0 + (self._position + TICK_SAMPLES) / SAMPLE_RATE
            wait = next_at - self._clock()
            if wait > 0:
                with self._lock:
                    if not self._closed and self._mixes:
                        self._wake.wait(wait)

    def advance(self, now: float) -> None:
        """Place the queued packets and mix every tick due by ``now`` (worker thread)."""
        started = time.thread_time()
        try:
            with self._lock:
                items = list(self._queue)
                self._queue.clear()
                mixes = list(self._mixes.values())
                inputs = dict(self._inputs)
            if self._t0 is None:
                self._t0 = now
            due = math.floor((now - self._t0) * SAMPLE_RATE / TICK_SAMPLES) * TICK_SAMPLES
            if due - self._position > MAX_BEHIND_S * SAMPLE_RATE:
                # far behind (a stall): skip to now; what was due is lost
                self._skips += 1
                self._position = due - TICK_SAMPLES
                for inp in inputs.values():
                    inp.timeline.clear()
            for mix in mixes:
                if mix.start_position is None:
                    mix.start_position = self._position
            for input_key, packet, arrival in items:
                target = inputs.get(input_key)
                if target is not None:
                    arrived_at = round((arrival - self._t0) * SAMPLE_RATE)
                    target.timeline.place(packet, arrived_at, arrival, self._position)
            while self._position + TICK_SAMPLES <= due:
                end = self._position + TICK_SAMPLES
                for mix in mixes:
                    start = mix.start_position
                    if end % mix.format.frame_samples == 0 and start is not None and end > start:
                        self._mix_frame(mix, inputs, end)
                self._position = end
                for inp in inputs.values():  # no mix reads this stretch again
                    inp.timeline.forget(end - MAX_FRAME_SAMPLES - TICK_SAMPLES, TICK_SAMPLES)
        finally:
            self._cpu_s += time.thread_time() - started

    def _mix_frame(self, mix: Mix, inputs: Mapping[InputKey, _Input], end: int) -> None:
        size = mix.format.frame_samples
        acc = np.zeros(size, np.int32)
        for input_key in mix.input_keys:
            inp = inputs.get(input_key)
            if inp is None:
                continue
            if inp.timeline.written_until < end:
                mix.stats.silent_inputs += 1
            acc += inp.timeline.read(end - size, size)
        peak = int(np.abs(acc).max(initial=0))
        want = min(1.0, LIMIT / peak) if peak else 1.0
        # down at once, back up by 0.1 per 20 ms; ramped across the frame: no click
        gain = want if want < mix.gain else min(want, mix.gain + 0.1 * size / TICK_SAMPLES)
        if gain < 1.0 or mix.gain < 1.0:
            ramp = np.linspace(mix.gain, gain, size, dtype=np.float32)
            acc = (acc * ramp).astype(np.int32)
        mix.gain = gain
        pcm = np.clip(acc, -32768, 32767).astype(np.int16)
        started = time.thread_time()
        try:
            packets = self._encode(mix, pcm, end - size)
        finally:
            mix.stats.encode_s += time.thread_time() - started
        for out in packets:
            position = mix.positions.popleft() if mix.positions else end - size
            data = bytes(out)
            mix.stats.frames += 1
            mix.stats.bytes += len(data)
            self._emit(mix, MediaPacket(data, position, AUDIO_TIME_BASE, True, "audio"))

    def _encode(
        self, mix: Mix, pcm: np.ndarray[Any, np.dtype[np.int16]], position: int
    ) -> list[av.Packet[Any]]:
        if mix.encoder is None:
            mix.encoder = _make_encoder(mix.format)
            mix.positions.clear()
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = position
        frame.time_base = Fraction(1, SAMPLE_RATE)
        mix.positions.append(position)
        try:
            return list(mix.encoder.encode(frame))
        except av.FFmpegError as exc:
            logger.warning("%r: encoder failed (%s), restarting it", mix, exc)
            mix.encoder = None
            return []

    def _emit(self, mix: Mix, packet: MediaPacket) -> None:
        if self._loop is None:
            self._deliver(mix, packet)
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, mix, packet)
        except RuntimeError:  # loop closed
            pass

    def _deliver(self, mix: Mix, packet: MediaPacket) -> None:
        with self._lock:
            if self._mixes.get(mix.key) is not mix:
                return  # released meanwhile
        mix.deliver(packet)


def _make_encoder(fmt: MixFormat) -> AudioCodecContext:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = SAMPLE_RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = fmt.bitrate
    codec.time_base = Fraction(1, SAMPLE_RATE)
    codec.options = {
        "application": "voip",
        "frame_duration": str(fmt.frame_ms),
        "vbr": "off",  # hard CBR: the wire rate is known before sending
    }
    codec.open()
    return codec


def _merge_into(total: MixStats, part: MixStats) -> None:
    total.frames += part.frames
    total.bytes += part.bytes
    total.encode_s += part.encode_s
    total.silent_inputs += part.silent_inputs
