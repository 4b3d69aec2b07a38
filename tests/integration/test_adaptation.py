"""Per-viewer adaptation with a viewer behind an emulated satellite link (real media)."""

from __future__ import annotations

import asyncio

from media_server.bot import Bot
from media_server.clip import Clip
from media_server.linkemu import LinkEmulator, get_profile
from tests.services import KonsiliumServer

# A loss cut on satellite can pause every video for ~8 s before the slow rise
# affords the lowest rung again: the window is long enough to see the lower rung
# the viewer keeps coming back to.  Its 3 audio originals (3 x 56 kbit/s of a
# 300 kbit/s link) usually become one mix (see test_audio_mix.py).
WINDOW_S = 15


async def test_satellite_viewer_gets_lower_rungs_and_audio_while_others_keep_originals(
    server: KonsiliumServer, clip: Clip
) -> None:
    # the good viewers count frames from RTP headers (light): cheaper, so the machine's
    # load does not turn into loss that the server would rightly adapt to
    publishers = [
        Bot(server.url, "room-1", server.mint(s), clip=clip, light=True)
        for s in ("pub-a", "pub-b", "pub-c")
    ]
    link = LinkEmulator(get_profile("satellite"), seed=7)
    weak = Bot(server.url, "room-1", server.mint("weak"), clip=clip, publish=False, link=link)
    try:
        for bot in publishers:
            await bot.start()
        await weak.start()
        # converge: the estimate must fall and the allocator move the weak viewer off originals
        for _ in range(40):
            await asyncio.sleep(1)
            layers = (await server.media())["layers"]
            weak_layers = layers.get("weak", {})
            if len(weak_layers) == 3 and all(v != "original" for v in weak_layers.values()):
                break
        media = await server.media()
        weak_layers = media["layers"].get("weak", {})
        assert len(weak_layers) == 3, f"weak viewer was never adapted: {media['layers']}"
        assert all(v != "original" for v in weak_layers.values()), (
            f"weak viewer still on an original: {media['layers']}"
        )
        # the good viewers keep every original stream untouched
        for pub in publishers:
            layers_of = media["layers"].get(pub.id, {})
            assert all(v == "original" for v in layers_of.values()), (
                f"good viewer {pub.id} was moved off an original: {media['layers']}"
            )

        # converged: within the next 30 s at least one video must flow again on a lower rung
        def video_frames() -> int:
            return sum(weak.stats.frames_from(p.id, "video") for p in publishers)

        flowing = False
        for _ in range(30):
            before = video_frames()
            await asyncio.sleep(1)
            if video_frames() - before >= 5:
                flowing = True
                break
        media = await server.media()
        assert flowing, (
            f"video never resumed on satellite: {media['layers']}; {link.stats()}; "
            f"{media['subscribers']['weak']}; {media['ladders']}"
        )
        assert all(v != "original" for v in media["layers"]["weak"].values()), (
            f"weak viewer went back to an original on satellite: {media['layers']}; "
            f"{media['subscribers']['weak']}"
        )
        # measure a window once converged
        audio0 = {p.id: weak.stats.frames_from(p.id, "audio") for p in publishers}
        video0 = {p.id: weak.stats.frames_from(p.id, "video") for p in publishers}
        good0 = publishers[0].stats.frames_from("pub-b")
        sent0 = publishers[1].sent("video")
        await asyncio.sleep(WINDOW_S)
        audio = {p.id: weak.stats.frames_from(p.id, "audio") - audio0[p.id] for p in publishers}
        mode = (await server.media())["audio"]["weak"]
        # "keeps receiving audio": not interrupted (loss is measured by the benchmark)
        if mode["mode"] == "mix":
            # one mix of everyone (see test_audio_mix.py), 40 or 60 ms frames, on one mid
            assert {t["participant_id"] for t in mode["tracks"]} == {p.id for p in publishers}
            assert sum(audio.values()) >= 0.8 * WINDOW_S * 1000 / 60, (
                f"mixed audio interrupted: {audio} packets in {WINDOW_S} s ({mode})"
            )
        else:
            for p in publishers:
                assert audio[p.id] >= 0.8 * WINDOW_S * 50, (
                    f"audio from {p.id} interrupted: {audio[p.id]} packets in {WINDOW_S} s"
                )
        videos = {p.id: weak.stats.frames_from(p.id, "video") - video0[p.id] for p in publishers}
        assert any(v > 0 for v in videos.values()), (
            f"no video at all on satellite: {videos}; link {link.stats()}"
        )
        good = publishers[0].stats.frames_from("pub-b") - good0
        sent = publishers[1].sent("video") - sent0
        assert good >= 0.9 * sent, f"a good viewer lost frames: {good}/{sent}"
        assert any(media["ladders"].get(f"{p.id}:camera", {}).get("active") for p in publishers), (
            f"no ladder running: {media['ladders']}"
        )
    finally:
        await weak.stop()
        for bot in publishers:
            await bot.stop()
        link.close()


async def test_a_satellite_viewer_gets_its_rung_twice_and_the_picture_keeps_moving(
    server: KonsiliumServer, clip: Clip
) -> None:
    """600 ms round trips and 2 % loss: NACK repairs would freeze the picture, copies do not."""
    publisher = Bot(server.url, "room-1", server.mint("pub-a"), clip=clip, light=True)
    link = LinkEmulator(get_profile("satellite"), seed=11)
    weak = Bot(server.url, "room-1", server.mint("weak"), clip=clip, publish=False, link=link)
    try:
        await publisher.start()
        await weak.start()
        media = await server.media()
        for _ in range(60):
            await asyncio.sleep(1)
            media = await server.media()
            if media["video_copies"].get("weak") == 2:
                break
        assert media["video_copies"].get("weak") == 2, (
            f"rung never repeated: {media['layers']} {media['estimates'].get('weak')}"
        )
        assert media["video_copies"].get(publisher.id) == 1  # a good viewer: nothing doubled
        layer = media["layers"]["weak"]
        assert all(v not in ("original", "paused") for v in layer.values()), layer

        def repeated() -> int:
            slots = media["subscribers"]["weak"]
            return sum(int(s.get("repeated_bytes", 0)) for s in slots)

        before_bytes = repeated()
        frames0 = weak.stats.frames_from(publisher.id, "video")
        await asyncio.sleep(10)
        media = await server.media()
        frames = weak.stats.frames_from(publisher.id, "video") - frames0
        assert repeated() > before_bytes, "no copies went out"
        assert frames >= 50, f"only {frames} frames in 10 s: {media['layers']}"
    finally:
        await weak.stop()
        await publisher.stop()
        link.close()
