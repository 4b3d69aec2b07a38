"""Chromium plays the server's Opus mix: a weak downlink, three speakers, one mix.

Three bots publish the pre-encoded clip (video and Opus audio) from the host.
Chromium runs inside a network namespace (``ShapedNamespace``) and only
subscribes. With ``tbf`` on the host end of the veth (what the server sends the
browser) well below what the three audio originals need (~170 kbit/s on the
wire), the server must switch the page to one Opus mix of everyone, carried on
one of its audio transceivers (``/api/rooms/{id}/media`` → ``audio[<viewer>]``).

What is asserted is what Chromium itself reports for the mid carrying the mix
(``getStats`` inbound-rtp): over 10 s it receives packets, its jitter buffer
delivers close to 48000 samples a second, and little of that is concealment.
The page exposes no peer connection, so an init script records every
``RTCPeerConnection`` the page creates. The figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from media_server.bot import Bot
from media_server.clip import Clip
from media_server.linkemu import ShapedNamespace, available
from tests.browser.conftest import PageLog, join
from tests.services import KonsiliumServer

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not available(), reason="needs root, iproute2 `ip netns` and the tbf qdisc"),
]

ROOM = "room-1"
SPEAKERS = 3
LIMIT_BPS = 112_000  # three audio originals take ~170 kbit/s on the wire
MIX_S = 30.0  # the server must name the mix within this long after the limit
WINDOW_S = 10.0  # the mix is measured on the page over this long
RATE = 48_000  # Opus plays at 48 kHz
MIN_RECEIVED = 0.8  # of RATE * WINDOW_S samples
MAX_CONCEALED = 0.2  # of the samples received in the window
POLL_S = 1.0

# Every RTCPeerConnection the page makes, for getStats (room.js exposes none).
RECORD_PCS = """
(() => {
  const Native = window.RTCPeerConnection;
  if (!Native || window.__konsiliumPcs) return;
  window.__konsiliumPcs = [];
  const Recorded = function (...args) {
    const pc = new Native(...args);
    window.__konsiliumPcs.push(pc);
    return pc;
  };
  Recorded.prototype = Native.prototype;
  Object.setPrototypeOf(Recorded, Native);
  window.RTCPeerConnection = Recorded;
})();
"""

# inbound-rtp audio of every recorded connection, keyed by mid, with its codec
AUDIO_STATS = """
async () => {
  const out = {};
  for (const pc of window.__konsiliumPcs || []) {
    if (pc.connectionState === "closed") continue;
    const report = await pc.getStats();
    const midByTrack = new Map();
    for (const tr of pc.getTransceivers()) {
      if (tr.receiver && tr.receiver.track) midByTrack.set(tr.receiver.track.id, tr.mid);
    }
    report.forEach((r) => {
      if (r.type !== "inbound-rtp" || r.kind !== "audio") return;
      const mid = r.mid != null ? String(r.mid) : midByTrack.get(r.trackIdentifier);
      if (mid == null) return;
      const codec = r.codecId ? report.get(r.codecId) : null;
      out[mid] = {
        ...r,
        codec: codec ? `${codec.mimeType}/${codec.clockRate}/${codec.channels || 1}` : null,
        pcState: pc.connectionState,
      };
    });
  }
  return out;
}
"""

FIELDS = (
    "packetsReceived",
    "packetsLost",
    "packetsDiscarded",
    "bytesReceived",
    "totalSamplesReceived",
    "concealedSamples",
    "silentConcealedSamples",
    "concealmentEvents",
    "insertedSamplesForDeceleration",
    "removedSamplesForAcceleration",
    "jitterBufferDelay",
    "jitterBufferTargetDelay",
    "jitterBufferEmittedCount",
    "totalAudioEnergy",
)


def num(stats: dict[str, Any], key: str) -> float:
    value = stats.get(key, 0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    return {k: num(after, k) - num(before, k) for k in FIELDS}


def buffer_ms(d: dict[str, float], key: str) -> float:
    """Mean jitter-buffer delay (or target) of the samples emitted, from deltas, in ms."""
    emitted = d["jitterBufferEmittedCount"]
    return d[key] / emitted * 1000 if emitted else 0.0


def per_second(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One poll's worth of the mix's stats: what changed since the previous poll."""
    d = delta(before, after)
    return (
        f"packets={d['packetsReceived']:.0f} lost={d['packetsLost']:.0f}"
        f" discarded={d['packetsDiscarded']:.0f} samples={d['totalSamplesReceived']:.0f}"
        f" concealed={d['concealedSamples']:.0f} buffer={buffer_ms(d, 'jitterBufferDelay'):.0f}ms"
        f" target={buffer_ms(d, 'jitterBufferTargetDelay'):.0f}ms jitter={after.get('jitter')}"
    )


def describe(stats: dict[str, Any]) -> str:
    parts = [f"{k}={stats[k]}" for k in FIELDS if k in stats]
    for k in ("jitter", "codec", "decoderImplementation", "audioLevel", "pcState"):
        if k in stats:
            parts.append(f"{k}={stats[k]}")
    return " ".join(parts)


async def audio_stats(page: Page) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = await page.evaluate(AUDIO_STATS)
    return stats


async def test_chromium_plays_the_opus_mix_on_a_weak_downlink(
    netns: ShapedNamespace, lan_server: KonsiliumServer, ns_browser: Browser, clip: Clip
) -> None:
    server = lan_server
    bots = [
        Bot(
            server.url,
            ROOM,
            server.mint(f"bot-{i}", name=f"Врач {i}"),
            clip=clip,
            light=True,
        )
        for i in range(SPEAKERS)
    ]
    for bot in bots:
        await bot.start()
    context = await ns_browser.new_context(locale="ru-RU", viewport={"width": 1280, "height": 720})
    timeline: list[str] = []
    media: dict[str, Any] = {}
    log: PageLog | None = None

    def why() -> str:
        return (
            "\n--- timeline ---\n"
            + "\n".join(timeline)
            + f"\n--- server media ---\n{media}"
            + (log.dump() if log is not None else "")
            + f"\n--- server log tail ---\n{server.log_text()[-6000:]}"
        )

    try:
        await context.add_init_script(RECORD_PCS)
        page = await context.new_page()
        log = PageLog(page)
        token = server.mint("viewer-ns", name="Петров С. И.", grants=("join", "subscribe"))
        # from inside the namespace the server is the host end of the veth
        url = f"http://{netns.host_addr}:{server.port}/r/{ROOM}#t={token}"
        await page.goto(url, wait_until="domcontentloaded")
        viewer = await join(page, log, 20)

        # the page must first receive the three originals (one audio mid each)
        began = time.monotonic()
        while time.monotonic() - began < 30:
            stats = await audio_stats(page)
            if sum(1 for s in stats.values() if num(s, "packetsReceived") > 0) >= SPEAKERS:
                break
            await asyncio.sleep(POLL_S)
        timeline.append(f"unshaped, {time.monotonic() - began:.1f}s after joining:")
        timeline += [f"  mid {m}: {describe(s)}" for m, s in sorted(stats.items())]
        receiving = [m for m, s in stats.items() if num(s, "packetsReceived") > 0]
        assert len(receiving) >= SPEAKERS, f"the page receives audio on {receiving}{why()}"

        # 1. the downlink limited: the server moves the page to the mix
        netns.apply_rate(LIMIT_BPS, direction="down")
        limited_at = time.monotonic()
        state: dict[str, Any] = {}
        while time.monotonic() - limited_at < MIX_S:
            media = await server.media(ROOM)
            state = media.get("audio", {}).get(viewer, {})
            timeline.append(
                f"{time.monotonic() - limited_at:5.1f}s audio={state}"
                f" estimate={media.get('estimates', {}).get(viewer)}"
            )
            if state.get("mode") == "mix":
                break
            await asyncio.sleep(POLL_S)
        assert state.get("mode") == "mix", (
            f"{MIX_S:.0f} s after the {LIMIT_BPS // 1000} kbit/s limit the server keeps"
            f" the page on {state}{why()}"
        )
        mix_s = time.monotonic() - limited_at
        mid = str(state["mid"])

        # 2. over the next WINDOW_S the page plays the mix on that mid
        first = await audio_stats(page)
        assert mid in first, f"the page has no inbound audio on mid {mid}: {first}{why()}"
        window_at = time.monotonic()
        timeline.append(f"mix on mid {mid}: {describe(first[mid])}")
        modes: list[str] = []
        previous = first[mid]
        while time.monotonic() - window_at < WINDOW_S:
            await asyncio.sleep(POLL_S)
            media = await server.media(ROOM)
            now = media.get("audio", {}).get(viewer, {})
            mode = f"{now.get('mode')}:{now.get('mid')}:{now.get('format')}x{now.get('copies')}"
            modes.append(mode)
            current = (await audio_stats(page)).get(mid, {})
            est = media.get("estimates", {}).get(viewer) or {}
            layers = media.get("layers", {}).get(viewer)
            timeline.append(
                f"  {time.monotonic() - window_at:4.1f}s {mode} {per_second(previous, current)}"
                f" | server: estimate={est.get('estimate_bps')}"
                f" delivered={est.get('delivered_bps')} rtt={est.get('rtt_s')} layers={layers}"
            )
            previous = current
        last = await audio_stats(page)
        elapsed = time.monotonic() - window_at
        timeline.append(f"after {elapsed:.1f}s, server said {' '.join(modes)}")
        timeline += [f"  mid {m}: {describe(s)}" for m, s in sorted(last.items())]
        d = delta(first[mid], last.get(mid, {}))
        expected = RATE * elapsed
        received, concealed = d["totalSamplesReceived"], d["concealedSamples"]
        figures = (
            f"\nChromium behind tbf {LIMIT_BPS // 1000} kbit/s: mix on mid {mid}"
            f" (at the switch {state.get('format')}, {state.get('bitrate')} bit/s,"
            f" copies={state.get('copies')}) {mix_s:.1f} s after the limit;"
            f" over {elapsed:.1f} s: samples {received:.0f} of {expected:.0f}"
            f" ({received / expected:.0%}), concealed {concealed:.0f}"
            f" ({concealed / received if received else 1:.1%}),"
            f" silent concealed {d['silentConcealedSamples']:.0f},"
            f" concealment events {d['concealmentEvents']:.0f},"
            f" packets {d['packetsReceived']:.0f} (lost {d['packetsLost']:.0f},"
            f" discarded {d['packetsDiscarded']:.0f}),"
            f" jitter {last.get(mid, {}).get('jitter')} s,"
            f" jitter buffer {buffer_ms(d, 'jitterBufferDelay'):.0f} ms"
            f" (target {buffer_ms(d, 'jitterBufferTargetDelay'):.0f} ms),"
            f" accelerated {d['removedSamplesForAcceleration']:.0f},"
            f" decelerated {d['insertedSamplesForDeceleration']:.0f} samples,"
            f" codec {last.get(mid, {}).get('codec')}"
        )
        print(f"{figures}\n" + "\n".join(timeline))

        assert all(m.startswith(f"mix:{mid}:") for m in modes), (
            f"the server left the mix during the window: {modes}{why()}"
        )
        assert d["packetsReceived"] > 0, f"no packets on mid {mid}{figures}{why()}"
        assert received >= MIN_RECEIVED * expected, f"too few samples{figures}{why()}"
        assert concealed < MAX_CONCEALED * received, f"too much concealment{figures}{why()}"
    finally:
        await context.close()
        for bot in bots:
            await bot.stop()
