"""A real server process and real aiortc bots exchanging real media."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from media_server.bot import Bot
from media_server.clip import Clip
from tests.services import KonsiliumServer


async def _start(server: KonsiliumServer, clip: Clip, sub: str, **kw: object) -> Bot:
    bot = Bot(server.url, "room-1", server.mint(sub, **kw), clip=clip)  # type: ignore[arg-type]
    await bot.start()
    return bot


def _all_receive_video(bots: list[Bot]) -> bool:
    return all(b.stats.frames_from(o.id) > 0 for b in bots for o in bots if o is not b)


async def test_three_bots_receive_each_others_frames(server: KonsiliumServer, clip: Clip) -> None:
    bots = [await _start(server, clip, f"bot-{i}") for i in range(3)]
    try:
        assert await bots[0].wait_until(lambda: _all_receive_video(bots), 10)
        sent0 = {b.id: b.sent("video") for b in bots}
        got0 = {(b.id, o.id): b.stats.frames_from(o.id) for b in bots for o in bots if o is not b}
        await asyncio.sleep(10)
        sent = {b.id: b.sent("video") - sent0[b.id] for b in bots}
        for b in bots:
            for o in bots:
                if o is b:
                    continue
                got = b.stats.frames_from(o.id) - got0[(b.id, o.id)]
                assert sent[o.id] >= 250, f"{o.id} sent only {sent[o.id]} frames in 10 s"
                ratio = got / sent[o.id]
                assert ratio >= 0.90, f"{b.id} got {got}/{sent[o.id]} frames of {o.id}"
                # audio flows too
                assert b.stats.frames_from(o.id, "audio") > 300
    finally:
        for b in bots:
            await b.stop()


async def test_late_joiner_gets_video_within_two_seconds(
    server: KonsiliumServer, clip: Clip
) -> None:
    early = [await _start(server, clip, f"early-{i}") for i in range(2)]
    try:
        # let the publishers run well past their first keyframe
        assert await early[0].wait_until(lambda: early[0].stats.frames_from("early-1") > 60, 10)
        joined = time.monotonic()
        late = await _start(server, clip, "late")
        ok = await late.wait_until(
            lambda: late.stats.frames_from("early-0") > 0 and late.stats.frames_from("early-1") > 0,
            5,
        )
        assert ok, "late joiner received no video"
        for pid in ("early-0", "early-1"):
            track = late.stats.received[(pid, "video")]
            assert track.first_frame_at is not None
            assert track.first_frame_at - joined <= 2.0, (pid, track.first_frame_at - joined)
            # it starts on a keyframe: the first packet was decodable
            assert track.keyframes >= 1
        # and the early ones see the late joiner
        assert await early[0].wait_until(lambda: early[0].stats.frames_from("late") > 0, 5)
        await late.stop()
    finally:
        for b in early:
            await b.stop()


async def _frames_stop(bot: Bot, pid: str, within: float) -> bool:
    deadline = time.monotonic() + within
    last = bot.stats.frames_from(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = bot.stats.frames_from(pid)
        if now == last:
            return True
        last = now
    return False


async def test_leaver_disappears_for_the_others(server: KonsiliumServer, clip: Clip) -> None:
    a, b, c = [await _start(server, clip, s) for s in ("a", "b", "c")]
    try:
        assert await a.wait_until(lambda: a.stats.frames_from("c") > 10, 10)
        left = time.monotonic()
        await c.stop()
        assert await a.wait_until(lambda: a.left.get("c") == "left", 5)
        assert time.monotonic() - left < 5
        assert "c" not in a.others
        assert not any(t["participant_id"] == "c" for t in a.mids.values())
        assert await _frames_stop(a, "c", 3)
        # the others still see each other
        before = a.stats.frames_from("b")
        await asyncio.sleep(1.5)
        assert a.stats.frames_from("b") > before + 20
    finally:
        await a.stop()
        await b.stop()


async def test_vanished_client_is_reconnecting_and_its_tracks_go_within_five_seconds(
    server: KonsiliumServer, clip: Clip
) -> None:
    a, gone = [await _start(server, clip, s) for s in ("a", "gone")]
    try:
        assert await a.wait_until(lambda: a.stats.frames_from("gone") > 10, 10)
        t0 = time.monotonic()
        await gone.kill()
        assert await a.wait_until(
            lambda: a.others.get("gone", {}).get("state") == "reconnecting", 5
        ), f"vanished client not shown as reconnecting: {a.others.get('gone')}"
        assert await a.wait_until(
            lambda: not any(t["participant_id"] == "gone" for t in a.mids.values()), 5
        )
        assert time.monotonic() - t0 <= 5
        assert "gone" not in a.left  # its place is kept during the grace period
    finally:
        await a.stop()


async def test_a_dropped_link_resumes_as_the_same_participant(
    server: KonsiliumServer, clip: Clip
) -> None:
    a = await _start(server, clip, "a")
    token = server.mint("field")
    field = Bot(server.url, "room-1", token, clip=clip)
    await field.start()
    try:
        assert await a.wait_until(lambda: a.stats.frames_from("field") > 10, 10)
        await field.kill()  # the satellite link drops: no goodbye
        assert await a.wait_until(
            lambda: a.others.get("field", {}).get("state") == "reconnecting", 5
        )
        await asyncio.sleep(20)
        back = Bot(server.url, "room-1", token, clip=clip)
        await back.start()
        try:
            assert back.participant.get("id") == "field"
            assert await a.wait_until(lambda: a.others.get("field", {}).get("state") == "active", 5)
            before = a.stats.frames_from("field")
            assert await a.wait_until(lambda: a.stats.frames_from("field") > before + 10, 5)
            assert "field" not in a.left, "the others saw 'left' for a link drop"
            assert back.stats.frames_from("a") > 0 or await back.wait_until(
                lambda: back.stats.frames_from("a") > 0, 5
            )
        finally:
            await back.stop()
    finally:
        await a.stop()


async def test_a_participant_that_does_not_come_back_leaves_after_the_grace_period(
    tmp_path: Path, clip: Clip
) -> None:
    with KonsiliumServer(tmp_path / "data", extra_args=("--reconnect-grace", "2")) as srv:
        a = Bot(srv.url, "room-1", srv.mint("a"), clip=clip)
        gone = Bot(srv.url, "room-1", srv.mint("gone"), clip=clip)
        await a.start()
        await gone.start()
        try:
            assert await a.wait_until(lambda: "gone" in a.others, 5)
            await gone.kill()
            assert await a.wait_until(lambda: a.left.get("gone") == "disconnected", 10)
        finally:
            await a.stop()


async def test_transceiver_of_a_leaver_is_reused_without_renegotiation(
    server: KonsiliumServer, clip: Clip
) -> None:
    a = await _start(server, clip, "a")
    b = await _start(server, clip, "b")
    try:
        assert await a.wait_until(lambda: a.stats.frames_from("b") > 10, 10)
        video_mid = next(
            m for m, t in a.mids.items() if t["participant_id"] == "b" and t["kind"] == "video"
        )
        await b.stop()
        assert await a.wait_until(lambda: "b" in a.left, 5)
        c = await _start(server, clip, "c")
        assert await a.wait_until(lambda: a.stats.frames_from("c") > 10, 5)
        c_mid = next(
            m for m, t in a.mids.items() if t["participant_id"] == "c" and t["kind"] == "video"
        )
        assert c_mid == video_mid
        await c.stop()
    finally:
        await a.stop()
