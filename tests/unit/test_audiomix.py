"""AudioMixer: known tones in, one decodable Opus stream with all of them out."""

from __future__ import annotations

import asyncio
import itertools
import time
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pytest

from media_server.audiomix import (
    MIX_FORMATS,
    AudioMixer,
    MixFormat,
)
from media_server.audiomode import MixSource
from media_server.mixinput import SAMPLE_RATE
from media_server.packet import AUDIO_TIME_BASE, MediaPacket
from tests.fakes import FakeSource

FRAME = 960  # the publishers' 20 ms Opus frames
FMT_40 = MixFormat("24k/40ms", 24_000, 40)
FMT_60 = MixFormat("16k/60ms", 16_000, 60)


def send(source: FakeSource, packet: MediaPacket) -> None:
    """The publisher's Forwarder hands a packet to its sinks (the mixer's feed)."""
    for sink in list(source.sinks):
        sink.push(packet)


class Sink:
    def __init__(self) -> None:
        self.packets: list[MediaPacket] = []
        self.at: list[float] = []

    def push(self, item: MediaPacket) -> None:
        self.packets.append(item)
        self.at.append(time.monotonic())


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def tone(freq: float, seconds: float, origin: int = 0, amplitude: int = 8000) -> list[MediaPacket]:
    """A publisher's Opus packets (20 ms, 48 kHz) of a sine tone, RTP timestamps from origin."""
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = SAMPLE_RATE
    enc.layout = "mono"
    enc.format = "s16"
    enc.bit_rate = 48_000
    enc.time_base = Fraction(1, SAMPLE_RATE)
    enc.options = {"application": "audio", "frame_duration": "20"}
    n = int(seconds * SAMPLE_RATE) // FRAME * FRAME
    t = np.arange(n)
    pcm = (amplitude * np.sin(2 * np.pi * freq * t / SAMPLE_RATE)).astype(np.int16)
    out: list[MediaPacket] = []
    for i in range(0, n, FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[i : i + FRAME].reshape(1, -1), "s16", "mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = i
        frame.time_base = Fraction(1, SAMPLE_RATE)
        for packet in enc.encode(frame):
            pts = (origin + len(out) * FRAME) % (1 << 32)
            out.append(MediaPacket(bytes(packet), pts, AUDIO_TIME_BASE, True, "audio"))
    return out


def decode(packets: list[MediaPacket]) -> tuple[np.ndarray[Any, Any], list[int]]:
    """Decoded mono PCM of a mixed stream, and each packet's sample count."""
    dec = av.CodecContext.create("libopus", "r")
    dec.sample_rate = SAMPLE_RATE
    dec.layout = "mono"
    dec.format = "s16"
    parts = []
    sizes = []
    for packet in packets:
        frames = dec.decode(av.Packet(packet.data))
        sizes.append(sum(f.samples for f in frames))
        parts += [np.asarray(f.to_ndarray()).reshape(-1) for f in frames]
    return np.concatenate(parts).astype(np.float64), sizes


def level_at(pcm: np.ndarray[Any, Any], freq: float) -> float:
    """Spectral magnitude within 10 Hz of ``freq``, relative to the spectrum's peak."""
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    freqs = np.fft.rfftfreq(len(pcm), 1 / SAMPLE_RATE)
    near = spectrum[(freqs > freq - 10) & (freqs < freq + 10)].max()
    return float(near / spectrum.max())


def run(
    mixer: AudioMixer,
    clock: Clock,
    feeds: list[tuple[FakeSource, list[MediaPacket]]],
    steps: int,
    jitter: list[float] | None = None,
) -> None:
    """Drive the mixer as the event loop and its worker would: one publisher frame per 20 ms."""
    start = clock.t
    for i in range(steps):
        clock.t = start + i * 0.02 + (jitter[i] if jitter else 0.0)
        for source, packets in feeds:
            if i < len(packets):
                send(source, packets[i])
        clock.t = start + i * 0.02
        mixer.advance(clock.t)


def test_two_tones_mix_into_one_decodable_stream_with_both() -> None:
    clock = Clock()
    mixer = AudioMixer("t", clock=clock, threaded=False)
    a, b = FakeSource(), FakeSource()
    mix = mixer.acquire({"a": a, "b": b}, FMT_40)
    sink = Sink()
    mix.attach(sink)
    # different RTP origins, one of them about to wrap
    run(mixer, clock, [(a, tone(440, 3)), (b, tone(1000, 3, origin=(1 << 32) - 20 * FRAME))], 150)
    packets = sink.packets
    assert 70 <= len(packets) <= 75  # one 40 ms frame per 40 ms of the 3 s
    steps = {q.pts - p.pts for p, q in itertools.pairwise(packets)}
    assert steps == {1920}  # the RTP timestamp advances by the frame's samples
    pcm, sizes = decode(packets)
    assert set(sizes) == {1920}
    # ~24 kbit/s CBR: 120 bytes a 40 ms frame
    assert all(110 <= len(p.data) <= 130 for p in packets[2:])
    steady = pcm[SAMPLE_RATE // 4 : -SAMPLE_RATE // 4]
    assert level_at(steady, 440) > 0.5
    assert level_at(steady, 1000) > 0.5
    assert level_at(steady, 700) < 0.05  # nothing in between
    stats = mixer.stats()
    assert stats["inputs"]["a"]["late"] == 0 and stats["inputs"]["b"]["late"] == 0


def test_a_missing_input_is_silence_not_a_stall() -> None:
    clock = Clock()
    mixer = AudioMixer("t", clock=clock, threaded=False)
    a, b = FakeSource(), FakeSource()
    mix = mixer.acquire({"a": a, "b": b}, FMT_60)
    sink = Sink()
    mix.attach(sink)
    # b sends one second and then stops; a goes on
    run(mixer, clock, [(a, tone(440, 3)), (b, tone(1000, 1))], 150)
    packets = sink.packets
    assert 48 <= len(packets) <= 50  # 60 ms frames, never waiting for b
    pcm, sizes = decode(packets)
    assert set(sizes) == {2880}
    late = pcm[int(1.5 * SAMPLE_RATE) : int(2.8 * SAMPLE_RATE)]
    assert level_at(late, 440) > 0.5
    assert level_at(late, 1000) < 0.05
    assert mix.stats.silent_inputs > 10


def test_an_input_that_never_sends_does_not_hold_the_others() -> None:
    clock = Clock()
    mixer = AudioMixer("t", clock=clock, threaded=False)
    a, b = FakeSource(), FakeSource()
    mix = mixer.acquire({"a": a, "b": b}, FMT_40)
    sink = Sink()
    mix.attach(sink)
    run(mixer, clock, [(a, tone(440, 2))], 100)
    assert len(sink.packets) >= 45
    pcm, _ = decode(sink.packets)
    assert level_at(pcm[SAMPLE_RATE // 4 :], 440) > 0.5


def test_jitter_within_the_delay_loses_nothing_and_late_packets_are_dropped() -> None:
    clock = Clock()
    mixer = AudioMixer("t", clock=clock, threaded=False)
    a = FakeSource()
    mix = mixer.acquire({"a": a}, FMT_40)
    sink = Sink()
    mix.attach(sink)
    rng = np.random.default_rng(1)
    jitter = list(rng.uniform(0, 0.03, 150))
    jitter[100] = 0.2  # one packet far too late: dropped, the others still fit
    run(mixer, clock, [(a, tone(440, 3))], 150, jitter)
    inp = mixer.stats()["inputs"]["a"]
    assert inp["late"] <= 1
    assert inp["resyncs"] == 0
    pcm, _ = decode(sink.packets)
    assert level_at(pcm[SAMPLE_RATE // 4 :], 440) > 0.5


def test_refcounting_shares_mixes_and_inputs_and_stops_them() -> None:
    clock = Clock()
    mixer = AudioMixer("t", clock=clock, threaded=False)
    a, b, c = FakeSource(), FakeSource(), FakeSource()
    m1 = mixer.acquire({"a": a, "b": b}, FMT_40)
    m2 = mixer.acquire({"b": b, "a": a}, FMT_40)
    assert m1 is m2  # same inputs, same format: one encoder for both viewers
    m3 = mixer.acquire({"a": a, "c": c}, FMT_40)
    m4 = mixer.acquire({"a": a, "b": b}, FMT_60)
    assert len({id(m) for m in (m1, m3, m4)}) == 3
    assert len(a.sinks) == 1 and len(b.sinks) == 1 and len(c.sinks) == 1  # decoded once
    assert mixer.input_ids() == {"a", "b", "c"}
    mixer.release(m3)
    assert c.sinks == [] and mixer.input_ids() == {"a", "b"}
    mixer.release(m1)
    assert mixer.active  # m1 still has its second viewer
    mixer.release(m2)
    mixer.release(m4)
    assert not mixer.active
    assert a.sinks == [] and b.sinks == []
    mixer.release(m4)  # twice: harmless
    mixer.close()
    mixer.close()


async def test_worker_thread_runs_only_while_a_mix_exists_and_delivers_on_the_loop() -> None:
    mixer = AudioMixer("t")
    a = FakeSource()
    packets = tone(440, 1.2)
    mix = mixer.acquire({"a": a}, FMT_40)
    source = MixSource(mix, copies=2)
    sink = Sink()
    source.attach(sink)
    thread = mixer._thread
    assert thread is not None and thread.is_alive()
    loop_thread = asyncio.get_running_loop()
    for packet in packets:
        send(a, packet)
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert loop_thread is asyncio.get_running_loop()
    # every 40 ms frame twice (copies), ~20 ms apart, same timestamp
    pts = [p.pts for p in sink.packets]
    assert len(pts) >= 40
    assert all(pts.count(x) == 2 for x in pts[:-2])
    first = sink.at[0::2][:10]
    second = sink.at[1::2][:10]
    assert all(0.01 < s - f < 0.06 for f, s in zip(first, second, strict=True))
    source.detach(sink)
    mixer.release(mix)
    thread.join(2)
    assert not thread.is_alive()
    assert mixer._thread is None
    # and starts again for the next mix
    mix = mixer.acquire({"a": a}, FMT_40)
    assert mixer._thread is not None and mixer._thread.is_alive()
    mixer.close()


def test_formats_are_cheaper_on_the_wire_than_an_original() -> None:
    wire = [f.wire_bps for f in MIX_FORMATS]
    assert wire == sorted(wire, reverse=True)
    assert wire[0] < 50_000 and wire[-1] < 22_000
    with pytest.raises(ValueError):
        MixFormat("bad", 16_000, 30)
