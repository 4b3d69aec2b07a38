"""Active speaker: the talking publisher is found from its audio levels and its
camera is served first to a viewer on a weak link (real media)."""

from __future__ import annotations

import asyncio
from typing import Any

from media_server.bot import Bot
from media_server.clip import Clip
from media_server.ladder import DEFAULT_RUNGS
from media_server.linkemu import LinkEmulator, get_profile
from tests.services import KonsiliumServer

RANK = {"paused": 0, **{r.name: r.bitrate for r in DEFAULT_RUNGS}, "original": 10**9}


def _served_first(media: dict[str, Any], viewer: str, speaker: str) -> bool:
    """On a link too small for every camera (converged), the speaker's camera has
    the viewer's best layer, better than someone else's."""
    estimate = media["estimates"].get(viewer, {}).get("estimate_bps", 10**9)
    if estimate > (get_profile("satellite").rate_bps or 0) * 1.5:
        return False  # not converged yet: everything may still fit
    layers = media["layers"].get(viewer, {})
    mine = RANK.get(layers.get(f"{speaker}:camera", "original"), 0)
    others = [RANK.get(v, 0) for k, v in layers.items() if not k.startswith(f"{speaker}:")]
    return bool(others) and mine > 0 and mine >= max(others) and mine > min(others)


async def test_the_speakers_camera_is_served_first_and_follows_the_floor(
    server: KonsiliumServer, clip: Clip
) -> None:
    publishers = {
        s: Bot(server.url, "room-1", server.mint(s), clip=clip, light=True, speaking=(s == "a"))
        for s in ("a", "b", "c")
    }
    weak = Bot(
        server.url,
        "room-1",
        server.mint("weak"),
        clip=clip,
        publish=False,
        link=LinkEmulator(get_profile("satellite"), seed=11),
    )
    try:
        for bot in publishers.values():
            await bot.start()
        await weak.start()
        media: dict[str, Any] = {}
        for _ in range(40):
            await asyncio.sleep(1)
            media = await server.media()
            if media["speaker"] == "a" and _served_first(media, "weak", "a"):
                await asyncio.sleep(3)  # and it holds
                media = await server.media()
                break
        assert media["speaker"] == "a", f"speaker not found from the levels: {media['speaker']}"
        assert _served_first(media, "weak", "a"), f"a is not served first: {media['layers']}"

        publishers["a"].speaking = False
        publishers["b"].speaking = True
        for _ in range(30):
            await asyncio.sleep(1)
            media = await server.media()
            if media["speaker"] == "b" and _served_first(media, "weak", "b"):
                break
        assert media["speaker"] == "b", f"the floor did not move to b: {media['speaker']}"
        assert _served_first(media, "weak", "b"), f"b is not served first: {media['layers']}"
    finally:
        for bot in [*publishers.values(), weak]:
            await bot.stop()
