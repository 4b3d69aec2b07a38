"""DownTrack: keyframe gating, overflow recovery, make-before-break switching, rebasing."""

from __future__ import annotations

import asyncio

from media_server.downtrack import DownTrack
from tests.fakes import FakeSource


async def _drain(track: DownTrack) -> list[bytes]:
    out = []
    while track.queued:
        out.append(bytes(await asyncio.wait_for(track.recv(), 1)))
    return out


async def test_new_binding_starts_on_a_keyframe_and_asks_for_one() -> None:
    src = FakeSource("a")
    track = DownTrack("video", "t")
    track.bind(src)
    assert src.keyframe_requests == 1
    src.emit(0)
    src.emit(3000)
    assert track.queued == 0 and track.frames_dropped == 2
    src.emit(6000, keyframe=True)
    src.emit(9000)
    assert await _drain(track) == [b"a:6000", b"a:9000"]


async def test_overflow_flushes_and_resumes_on_next_keyframe() -> None:
    src = FakeSource("a")
    track = DownTrack("video", "t", capacity=3)
    track.bind(src)
    src.emit(0, keyframe=True)
    for i in range(1, 4):
        src.emit(i * 3000)  # the fourth packet overflows the queue of 3
    assert track.overflows == 1 and track.queued == 0
    requests = src.keyframe_requests
    src.emit(5 * 3000)
    assert track.queued == 0 and src.keyframe_requests == requests
    src.emit(6 * 3000, keyframe=True)
    assert await _drain(track) == [b"a:18000"]


async def test_switch_keeps_the_old_stream_until_the_new_one_has_a_keyframe() -> None:
    original, rung = FakeSource("orig"), FakeSource("rung")
    track = DownTrack("video", "t")
    track.bind(original)
    original.emit(0, keyframe=True)
    track.switch(rung)
    assert rung.keyframe_requests == 1
    original.emit(3000)
    rung.emit(3000)  # not a keyframe: ignored, the original still flows
    original.emit(6000)
    rung.emit(9000, keyframe=True)  # switch happens here
    original.emit(9000)
    rung.emit(12000)
    got = await _drain(track)
    assert got == [b"orig:0", b"orig:3000", b"orig:6000", b"rung:9000", b"rung:12000"]
    assert track.source is rung and track.switches == 1
    assert original.sinks == [] and rung.sinks == [track]


async def test_switch_back_before_the_keyframe_cancels() -> None:
    original, rung = FakeSource("orig"), FakeSource("rung")
    track = DownTrack("video", "t")
    track.bind(original)
    original.emit(0, keyframe=True)
    track.switch(rung)
    track.switch(original)
    assert rung.sinks == []
    rung.emit(3000, keyframe=True)
    assert track.source is original and track.switches == 0


async def test_rebinding_to_another_track_keeps_one_timeline() -> None:
    first, second = FakeSource("p1"), FakeSource("p2")
    track = DownTrack("video", "t")
    track.bind(first)
    first.emit(500_000, keyframe=True)
    first.emit(503_000)
    out = [await track.recv(), await track.recv()]
    assert [p.pts for p in out] == [500_000, 503_000]  # first source: passed through as is
    track.bind(second)
    second.emit(42, keyframe=True)
    nxt = await track.recv()
    assert nxt.pts > 503_000  # continues forward, no jump back to the other publisher's clock
    assert nxt.pts < 503_000 + 90000  # and no leap into the future


async def test_stop_ends_the_sender_loop() -> None:
    from aiortc.mediastreams import MediaStreamError

    track = DownTrack("audio", "t")
    waiter = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    track.stop()
    try:
        await asyncio.wait_for(waiter, 1)
    except MediaStreamError:
        pass
    else:
        raise AssertionError("recv() returned after stop()")


def test_vp8_keyframe_size_reads_the_clip() -> None:
    from media_server.clip import load_clip
    from media_server.packet import vp8_keyframe_size

    clip = load_clip()
    assert vp8_keyframe_size(clip.video[0].data) == (640, 360)
    assert vp8_keyframe_size(clip.video[1].data) is None  # not a keyframe
