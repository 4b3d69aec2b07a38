"""Ladder: real clip packets in, decodable lower rungs out, started and stopped on demand."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, cast

import av
import pytest

from media_server.clip import Clip, load_clip
from media_server.downtrack import DownTrack
from media_server.ladder import DEFAULT_RUNGS, Ladder, Rung, usable_rungs
from media_server.packet import MediaPacket

FPS = 30
TWO_SECONDS = 2 * FPS
WAIT_S = 10.0


@pytest.fixture(scope="module")
def clip() -> Clip:
    # the bots' default clip (640x360, 30 fps, 500 kbit/s, keyframes at 0 and 60),
    # from the shared cache: encoded once per machine
    return load_clip()


class Sink:
    def __init__(self) -> None:
        self.packets: list[MediaPacket] = []
        self.threads: set[int] = set()

    def push(self, item: MediaPacket) -> None:
        self.threads.add(threading.get_ident())
        self.packets.append(item)


@pytest.fixture
def asks() -> list[int]:
    """One entry per keyframe request the ladder sends to the original's publisher."""
    return []


@pytest.fixture
def ladder(asks: list[int]) -> Iterator[Ladder]:
    lad = Ladder("cam-1", request_source_keyframe=lambda: asks.append(1))
    yield lad
    lad.close()


def feed(ladder: Ladder, packets: tuple[MediaPacket, ...] | list[MediaPacket]) -> None:
    """Push at the pace the worker keeps (a live source is slower than the worker)."""
    for packet in packets:
        ladder.push(packet)
        assert ladder.wait_idle(WAIT_S)


def decode(packets: list[MediaPacket]) -> list[av.VideoFrame]:
    """Decode with libvpx (not the ladder's own decoder); raises on a broken stream."""
    codec = av.CodecContext.create("libvpx", "r")
    frames: list[av.VideoFrame] = []
    for packet in packets:
        raw = av.Packet(packet.data)
        raw.pts = packet.pts
        raw.time_base = Fraction(1, 90000)
        frames.extend(codec.decode(raw))
    frames.extend(codec.decode(None))
    return frames


def rung(name: str) -> Rung:
    return next(r for r in DEFAULT_RUNGS if r.name == name)


def test_two_rungs_decode_at_their_size_rate_and_frame_rate(
    ladder: Ladder, clip: Clip, asks: list[int]
) -> None:
    sinks = {"360p": Sink(), "180p": Sink()}
    for name, sink in sinks.items():
        ladder.attach(name, sink)
        ladder.acquire(name)
    source = clip.video[:TWO_SECONDS]
    feed(ladder, source)
    stats = ladder.stats()
    source_pts = [p.pts for p in source]
    for name, sink in sinks.items():
        r = rung(name)
        out = sink.packets
        expected_frames = TWO_SECONDS * r.fps // FPS
        assert abs(len(out) - expected_frames) <= 1, name
        assert out[0].keyframe, name
        assert sum(p.keyframe for p in out) == 1, name  # no automatic keyframes
        frames = decode(out)
        assert len(frames) == len(out)
        assert {(f.width, f.height) for f in frames} == {(r.width, r.height)}
        pts = [p.pts for p in out]
        assert all(b > a for a, b in itertools.pairwise(pts)), name
        assert set(pts) <= set(source_pts)  # the original's timestamps
        assert pts[1] - pts[0] == 90000 // r.fps
        bitrate = 8 * sum(len(p.data) for p in out) / 2.0
        assert 0.65 * r.bitrate <= bitrate <= 1.35 * r.bitrate, (name, bitrate)
        s = stats.rungs[name]
        assert s.frames == len(out) and (s.width, s.height) == (r.width, r.height)
        print(
            f"\n{name}: {s.width}x{s.height}@{r.fps} {bitrate / 1000:.0f} kbit/s"
            f" (target {r.bitrate // 1000}), encode+scale {s.encode_ms_per_frame:.2f} ms/frame"
        )
    print(
        f"decode {1000 * stats.decode_s / stats.frames_decoded:.2f} ms/frame,"
        f" ladder CPU {1000 * stats.cpu_s / 2.0:.0f} ms per second of video"
    )
    assert stats.frames_decoded == TWO_SECONDS and stats.packets_dropped == 0
    assert stats.cpu_s >= stats.decode_s + sum(s.encode_s for s in stats.rungs.values()) * 0.9
    assert asks == [1]  # asked once, when it started


def test_releasing_a_rung_stops_its_output(ladder: Ladder, clip: Clip) -> None:
    high, low = Sink(), Sink()
    ladder.attach("360p", high)
    ladder.attach("180p", low)
    ladder.acquire("360p")
    ladder.acquire("180p")
    ladder.acquire("180p")  # two users
    feed(ladder, clip.video[:20])
    ladder.release("180p")
    feed(ladder, clip.video[20:30])
    assert len(low.packets) == 15  # one user left: still running
    ladder.release("180p")
    assert ladder.active_rungs() == ["360p"]
    feed(ladder, clip.video[30:TWO_SECONDS])
    assert len(low.packets) == 15
    assert len(high.packets) == TWO_SECONDS
    ladder.release("360p")
    assert not ladder.active
    feed(ladder, clip.video[TWO_SECONDS : TWO_SECONDS + 10])
    assert len(high.packets) == TWO_SECONDS
    assert ladder.stats().packets_in == TWO_SECONDS  # idle: not even counted


def test_request_keyframe_yields_one_soon(ladder: Ladder, clip: Clip) -> None:
    sink = Sink()
    ladder.attach("240p", sink)
    ladder.acquire("240p")
    feed(ladder, clip.video[:30])
    before = len(sink.packets)
    ladder.request_keyframe("240p")
    feed(ladder, clip.video[30:TWO_SECONDS])
    after = sink.packets[before:]
    first = next(i for i, p in enumerate(after) if p.keyframe)
    assert first == 0  # the last keyframe was 1 s ago: honoured on the next frame
    assert sum(p.keyframe for p in after) == 1
    decode(sink.packets)


def test_keyframe_requests_are_throttled(ladder: Ladder, clip: Clip) -> None:
    sink = Sink()
    ladder.attach("360p", sink)
    ladder.acquire("360p")
    feed(ladder, clip.video[:3])
    ladder.request_keyframe("360p")  # 0.1 s after the first keyframe: waits until 0.5 s
    feed(ladder, clip.video[3:TWO_SECONDS])
    keys = [i for i, p in enumerate(sink.packets) if p.keyframe]
    assert keys == [0, 15]


def test_a_late_start_waits_for_a_source_keyframe(
    ladder: Ladder, clip: Clip, asks: list[int]
) -> None:
    sink = Sink()
    ladder.attach("180p", sink)
    ladder.acquire("180p")
    assert asks == [1]
    feed(ladder, clip.video[10:20])  # mid-GOP: undecodable, dropped
    assert sink.packets == []
    assert clip.video[60].keyframe
    feed(ladder, clip.video[60:80])
    assert len(sink.packets) == 10
    assert sink.packets[0].pts == clip.video[60].pts and sink.packets[0].keyframe
    assert ladder.stats().packets_dropped == 10


def test_falling_behind_flushes_and_resumes_on_a_keyframe(clip: Clip) -> None:
    gate = threading.Event()
    asks: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as shared:
        shared.submit(gate.wait, WAIT_S)  # the shared worker is busy elsewhere
        ladder = Ladder(
            "cam-2",
            executor=shared,
            queue_packets=4,
            request_source_keyframe=lambda: asks.append(1),
        )
        sink = Sink()
        ladder.attach("360p", sink)
        ladder.acquire("360p")
        for packet in clip.video[:10]:
            ladder.push(packet)  # 4 queued, the 5th overflows: all dropped until a keyframe
        for packet in clip.video[60:63]:
            ladder.push(packet)
        gate.set()
        assert ladder.wait_idle(WAIT_S)
        feed(ladder, clip.video[63:90])
        stats = ladder.stats()
        ladder.close()
    assert asks == [1, 1]  # at start, and when it fell behind
    assert stats.packets_dropped == 10 and stats.decode_errors == 0
    assert [p.pts for p in sink.packets] == [p.pts for p in clip.video[60:90]]
    assert len(decode(sink.packets)) == 30


async def test_sinks_run_on_the_event_loop_and_a_released_rung_delivers_nothing(
    clip: Clip,
) -> None:
    loop = asyncio.get_running_loop()
    ladder = Ladder("cam-3", loop=loop)
    sink = Sink()
    ladder.attach("90p", sink)
    ladder.acquire("90p")
    for packet in clip.video[:15]:
        ladder.push(packet)
        await asyncio.to_thread(ladder.wait_idle, WAIT_S)
    await asyncio.sleep(0)
    assert len(sink.packets) == 5  # 10 fps
    assert sink.threads == {threading.get_ident()}
    # packets encoded but not yet delivered when the rung is released are dropped
    ladder.push(clip.video[15])
    ladder.push(clip.video[16])
    ladder.push(clip.video[17])
    assert ladder.wait_idle(WAIT_S)  # blocks the loop: deliveries stay queued
    assert ladder.stats().rungs["90p"].frames == 6
    ladder.release("90p")
    await asyncio.sleep(0.05)
    assert len(sink.packets) == 5
    ladder.close()
    ladder.close()


class OneRung:
    """The least a DownTrack needs from its source, for one rung."""

    def __init__(self, ladder: Ladder, rung: str) -> None:
        self.ladder, self.rung = ladder, rung

    def attach(self, sink: DownTrack) -> None:
        self.ladder.attach(self.rung, sink)
        self.ladder.acquire(self.rung)

    def detach(self, sink: DownTrack) -> None:
        self.ladder.detach(self.rung, sink)
        self.ladder.release(self.rung)

    def request_keyframe(self) -> None:
        self.ladder.request_keyframe(self.rung)


async def test_a_downtrack_bound_to_a_rung_gets_a_decodable_rebased_stream(clip: Clip) -> None:
    ladder = Ladder("cam-4", loop=asyncio.get_running_loop())
    track = DownTrack("video", "viewer-1")
    track.bind(cast(Any, OneRung(ladder, "180p")))
    assert ladder.active_rungs() == ["180p"]
    for packet in clip.video[:20]:
        ladder.push(packet)
        await asyncio.to_thread(ladder.wait_idle, WAIT_S)
    received = [await asyncio.wait_for(track.recv(), WAIT_S) for _ in range(10)]
    assert received[0].keyframe
    assert [p.pts for p in received] == [6000 * i for i in range(10)]  # rebased from 0
    assert len(decode(received)) == 10
    track.unbind()
    assert not ladder.active
    track.stop()
    ladder.close()


def test_rung_sizes_keep_the_aspect_ratio_and_never_upscale() -> None:
    r = rung("180p")
    assert r.size_for(640, 360) == (320, 180)
    assert r.size_for(1280, 720) == (320, 180)
    assert r.size_for(360, 640) == (180, 320)  # portrait phone
    assert r.size_for(640, 480) == (278, 208)  # 4:3, same pixel budget
    assert r.size_for(160, 90) == (160, 90)
    assert rung("240p").size_for(640, 360) == (426, 240)


def test_usable_rungs_sit_below_the_original_and_close_together() -> None:
    names = [r.name for r in usable_rungs(640, 360, 500_000)]
    assert names == ["360p", "288p", "240p", "180p", "144p", "120p", "90p"]
    ordered = sorted(DEFAULT_RUNGS, key=lambda r: r.bitrate)
    for lower, upper in itertools.pairwise(ordered):
        assert upper.bitrate <= 1.5 * lower.bitrate + 10_000  # reachable under REMB's clamp


def test_unknown_rungs_are_rejected(ladder: Ladder) -> None:
    with pytest.raises(KeyError):
        ladder.acquire("4k")
    with pytest.raises(ValueError):
        Ladder("dup", [rung("90p"), rung("90p")])
