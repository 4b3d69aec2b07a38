"""A viewer on EDGE gets one audio mix of everyone and hears it without a break (real media)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from media_server.bot import Bot
from media_server.clip import Clip
from media_server.linkemu import Fate, LinkEmulator, get_profile
from media_server.linkemu.emulator import Address, Deliver
from tests.services import KonsiliumServer

WINDOW_S = 15
MAX_GAP_S = 0.5


class Listener(Bot):
    """A bot that keeps each audio packet's arrival and mid as the link hands it over, and
    the audio_mode messages.

    Counted before aiortc's receiver, like the weak-link benchmark: aiortc's audio
    jitter buffer turns each lost packet into a backlog and drops received ones later,
    which a browser's does not.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audio_at: list[tuple[float, str]] = []
        self.audio_modes: list[dict[str, Any]] = []
        assert self.link is not None
        real_send = self.link.down.send

        def send(data: bytes, addr: Address = None, deliver: Deliver | None = None) -> Fate:
            if deliver is None:
                return real_send(data, addr)
            target = deliver

            def tapped(d: bytes, a: Address) -> None:
                self._note_rtp(d)
                target(d, a)

            return real_send(data, addr, tapped)

        self.link.down.send = send  # type: ignore[method-assign]  # this emulator only

    def _note_rtp(self, data: bytes) -> None:
        if len(data) < 12 or not 128 <= data[0] < 192 or 64 <= (data[1] & 0x7F) <= 95:
            return  # not RTP
        mid = self._ssrc_mid.get(int.from_bytes(data[8:12], "big"))
        info = self.mids.get(mid) if mid is not None else None
        if mid is not None and info is not None and info["kind"] == "audio":
            self.audio_at.append((time.monotonic(), mid))

    async def _handle(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "audio_mode":
            self.audio_modes.append(msg)
        await super()._handle(msg)


async def test_edge_viewer_gets_one_mix_and_continuous_audio_while_others_keep_originals(
    server: KonsiliumServer, clip: Clip
) -> None:
    publishers = [
        Bot(server.url, "room-1", server.mint(s), clip=clip, light=True)
        for s in ("pub-a", "pub-b", "pub-c")
    ]
    link = LinkEmulator(get_profile("edge"), seed=11)
    weak = Listener(server.url, "room-1", server.mint("weak"), clip=clip, publish=False, link=link)
    try:
        for bot in publishers:
            await bot.start()
        await weak.start()
        mixing: dict[str, Any] = {}
        for _ in range(60):
            await asyncio.sleep(1)
            mixing = (await server.media())["audio"].get("weak", {})
            if mixing.get("mode") == "mix":
                break
        media = await server.media()
        assert mixing.get("mode") == "mix", (
            f"no mix on edge: {media['audio']}; {media['layers']}; {link.stats()}"
        )
        mixed = {t["id"] for t in mixing["tracks"]}
        assert mixed == {f"{p.id}:microphone" for p in publishers}
        assert mixing["frame_ms"] in (40, 60)
        # the good viewers keep the originals, and nobody's mix holds its own voice
        for pub in publishers:
            assert media["audio"][pub.id]["mode"] == "originals", media["audio"]
        for viewer, state in media["audio"].items():
            assert all(t["participant_id"] != viewer for t in state.get("tracks", []))
        # one mix, decoded once per publisher, shared
        assert len(media["audio_mix"]["mixes"]) == 1, media["audio_mix"]
        # the client was told, with the mid that carries the mix
        assert weak.audio_modes and weak.audio_modes[-1]["mode"] == "mix"
        carrier = weak.audio_modes[-1]["mid"]
        assert carrier == mixing["mid"]

        # converged: let the link settle, then watch a window
        await asyncio.sleep(5)
        t0 = time.monotonic()
        good0 = publishers[0].stats.frames_from(publishers[1].id, "audio")
        await asyncio.sleep(WINDOW_S)
        t1 = time.monotonic()
        media = await server.media()
        assert media["audio"]["weak"]["mode"] == "mix", "left the mix on edge"
        window = [(at, mid) for at, mid in weak.audio_at if t0 <= at <= t1]
        mids = {mid for _, mid in window}
        assert mids == {media["audio"]["weak"]["mid"]}, f"audio on several mids: {mids}"
        arrivals = [t0] + [at for at, _ in window] + [t1]
        gap = max(b - a for a, b in itertools.pairwise(arrivals))
        frame_s = media["audio"]["weak"]["frame_ms"] / 1000
        assert len(window) >= 0.8 * WINDOW_S / frame_s, (
            f"{len(window)} mixed packets in {WINDOW_S} s; {link.stats()}"
        )
        assert gap <= MAX_GAP_S, f"audio interrupted for {gap:.2f} s; {link.stats()}"
        # a good viewer still gets the originals
        good = publishers[0].stats.frames_from(publishers[1].id, "audio") - good0
        assert good >= 0.9 * WINDOW_S * 50, f"a good viewer lost audio: {good}"
    finally:
        await weak.stop()
        for bot in publishers:
            await bot.stop()
        link.close()
