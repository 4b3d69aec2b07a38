"""Liveness over a real server: a silent WebSocket, with and without media."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from media_server.bot import Bot
from media_server.clip import Clip
from tests.services import KonsiliumServer


async def test_a_silent_websocket_whose_media_flows_is_not_dropped(
    server: KonsiliumServer, clip: Clip
) -> None:
    """A late pong on a slow link must not throw the clinic out while its media flows."""
    a = Bot(server.url, "room-1", server.mint("a"), clip=clip)
    field = Bot(server.url, "room-1", server.mint("field"), clip=clip)
    await a.start()
    await field.start()
    try:
        assert await a.wait_until(lambda: a.stats.frames_from("field") > 10, 10)
        field.stop_reading_signalling()
        await asyncio.sleep(9)  # well past the 5 s a silent, media-less link gets
        assert a.others.get("field", {}).get("state") == "active", a.others.get("field")
        before = a.stats.frames_from("field")
        assert await a.wait_until(lambda: a.stats.frames_from("field") > before + 10, 5)
    finally:
        await a.stop()
        await field.stop()


async def test_a_silent_websocket_without_media_is_a_dropped_link_within_seconds(
    server: KonsiliumServer, clip: Clip
) -> None:
    a = Bot(server.url, "room-1", server.mint("a"), clip=clip)
    await a.start()
    async with aiohttp.ClientSession() as session:
        ws_url = server.url.replace("http://", "ws://") + "/ws"
        # autoping off and never read again: the server's pings go unanswered
        async with session.ws_connect(ws_url, autoping=False, heartbeat=None) as ws:
            token = server.mint("quiet", grants=("join", "subscribe"))
            await ws.send_str(
                json.dumps({"type": "join", "v": 1, "room": "room-1", "token": token})
            )
            joined = json.loads((await ws.receive()).data)
            assert joined["type"] == "joined"
            try:
                assert await a.wait_until(lambda: "quiet" in a.others, 5)
                t0 = time.monotonic()
                assert await a.wait_until(
                    lambda: a.others.get("quiet", {}).get("state") == "reconnecting", 10
                ), a.others.get("quiet")
                took = time.monotonic() - t0
                assert took <= 7.0, f"a silent link was seen dropped only after {took:.1f} s"
            finally:
                await a.stop()
