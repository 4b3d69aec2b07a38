"""Chromium on a weak uplink: it publishes through a kernel rate limit and stays audible.

Chromium runs inside a network namespace (``ShapedNamespace``); ``tbf`` on the
namespace end of the veth shapes what the browser sends the server (its uplink)
to the ``3g`` profile's rate and queue (450 kbit/s, 400 ms; the kernel has no
netem, so the profile's delay and loss are not applied: the tbf queue is the
only source of delay and loss). The page publishes its camera (640x360, 30 fps)
and fake microphone; a bot on the host (lan, subscribe only) counts
what the server forwards from it.

The fake camera shows a noisy moving picture from a file (Chromium's own one is
so still that VP8 codes it in ~200 kbit/s whatever its target): on the
unshaped link Chromium climbs well above 450 kbit/s of video. Once the uplink
is limited, the server's REMB (aiortc's delay-based receive-side
estimator) and Chromium's own loss-based control must bring its video under the
link rate, so that its audio gets through: after a convergence period the bot
must receive Chromium's audio at ~50 packets a second with no gap over 500 ms
(issue 3, "a publisher on 3g stays audible"), and still its video, at whatever
rate the link carries. Run with ``-s`` for the timeline (Chromium's outbound
``getStats`` each second, the bot's arrival rates).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from media_server.bot import Bot
from media_server.linkemu import ShapedNamespace, available, get_profile
from tests.browser.conftest import PageLog, browser_in_netns, join, media_origin_args
from tests.services import KonsiliumServer

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not available(), reason="needs root, iproute2 `ip netns` and the tbf qdisc"),
]

ROOM = "room-1"
PROFILE = get_profile("3g")
assert PROFILE.rate_bps is not None
LINK_BPS = PROFILE.rate_bps  # 450 kbit/s, on the uplink only
JOIN_S = 30.0  # the page joins and the bot receives its audio and video within this long
# unshaped: Chromium climbs (the server's REMB lets it grow ~8 %/s) to at least
# TRY_BPS of video, within BASELINE_S
TRY_BPS = 1.5 * LINK_BPS
BASELINE_S = 45.0
CONVERGE_S = 25.0  # limited: time allowed to settle before the measured window
WINDOW_S = 15.0  # the measured window
AUDIO_PPS = 50.0  # Opus, 20 ms frames
AUDIO_SHARE = 0.95  # of AUDIO_PPS, at least, over the window
AUDIO_MAX_GAP_S = 0.5
VIDEO_FPS = 5.0  # the bot still sees the camera at least this often
STATS_EVERY_S = 1.0
POLL_S = 0.01  # how often the bot's counters are read (the gap resolution)
# per packet beyond RTP header and payload: SRTP auth tag 10 B, UDP 8 B, IPv4 20 B
WIRE_OVERHEAD_B = 38

CAMERA = (640, 360, 30)  # what the page asks getUserMedia for (room.js VIDEO_CONSTRAINTS)
CAMERA_LOOP_S = 3  # the fake camera's file, looped by Chromium

# The page's peer connections, for the publisher's full getStats (the page itself
# only exposes a summary of its outbound video on window.konsilium.publishStats).
TRACK_PEER_CONNECTIONS = """
(() => {
  const Native = window.RTCPeerConnection;
  if (!Native || window.__testPcs) return;
  const pcs = (window.__testPcs = []);
  window.RTCPeerConnection = class extends Native {
    constructor(...args) {
      super(...args);
      pcs.push(this);
    }
  };
})();
"""

PUBLISH_STATS = """
async () => {
  const pc = (window.__testPcs || []).find((p) => p.getSenders().some((s) => s.track));
  if (!pc) return null;
  const out = { at: performance.now(), video: null, audio: null, remote: {}, pair: null };
  const report = await pc.getStats();
  report.forEach((r) => {
    if (r.type === "outbound-rtp") out[r.kind] = r;
    else if (r.type === "remote-inbound-rtp") out.remote[r.kind] = r;
    else if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") out.pair = r;
  });
  return JSON.parse(JSON.stringify(out));
}
"""


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A camera picture a real encoder has to work for: moving test pattern, fresh noise.

    Chromium's built-in fake camera is a nearly still picture that VP8 codes in
    ~200 kbit/s at 640x360 whatever its target, and aiortc's REMB never exceeds
    1.5x what it receives: Chromium then stays at ~250 kbit/s on the wire and the
    450 kbit/s limit never bites. Noise that changes every frame makes the
    encoder fill its target, as a real camera in a dim room does.
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.fail("ffmpeg is missing (scripts/install-system installs it)", pytrace=False)
    width, height, fps = CAMERA
    path = tmp_path_factory.mktemp("camera") / f"noisy-{width}x{height}.y4m"
    subprocess.run(
        [ffmpeg, "-loglevel", "error", "-f", "lavfi",
         "-i", f"testsrc2=size={width}x{height}:rate={fps}",
         "-vf", "noise=alls=24:allf=t+u,format=yuv420p",
         "-t", str(CAMERA_LOOP_S), "-y", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


@pytest.fixture
async def publishing_browser(
    chromium: Path,
    netns: ShapedNamespace,
    lan_server: KonsiliumServer,
    camera_file: Path,
    tmp_path: Path,
) -> AsyncIterator[Browser]:
    """Chromium in ``netns``, allowed to publish, its camera showing ``camera_file``."""
    args = (
        *media_origin_args(netns, lan_server),
        f"--use-file-for-fake-video-capture={camera_file}",
    )
    async with browser_in_netns(netns, chromium, tmp_path, *args) as browser:
        yield browser


# -- what the bot receives from the publisher ---------------------------------------


class Received:
    """When the bot received each of one participant's audio packets and video frames.

    Polls the bot's public counters every POLL_S: each time a count grows, the time
    of the latest arrival is kept (gaps are exact to about POLL_S).
    """

    def __init__(self, bot: Bot, participant_id: str) -> None:
        self.bot, self.pid = bot, participant_id
        self.arrivals: dict[str, list[tuple[float, int]]] = {"audio": [], "video": []}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            for kind, arrivals in self.arrivals.items():
                track = self.bot.stats.received.get((self.pid, kind))
                if track is None or track.last_frame_at is None:
                    continue
                if not arrivals or track.frames > arrivals[-1][1]:
                    arrivals.append((track.last_frame_at, track.frames))
            await asyncio.sleep(POLL_S)

    def count(self, kind: str) -> int:
        arrivals = self.arrivals[kind]
        return arrivals[-1][1] if arrivals else 0

    def window(self, kind: str, start: float, end: float) -> tuple[float, float]:
        """(arrivals per second, longest gap in seconds) between ``start`` and ``end``."""
        inside = [(t, n) for t, n in self.arrivals[kind] if start <= t <= end]
        before = [n for t, n in self.arrivals[kind] if t < start]
        if not inside:
            return 0.0, end - start
        counted = inside[-1][1] - (before[-1] if before else 0)
        times = [start, *(t for t, _ in inside), end]
        return counted / (end - start), max(b - a for a, b in itertools.pairwise(times))

    def describe(self, start: float, end: float) -> str:
        audio, audio_gap = self.window("audio", start, end)
        video, video_gap = self.window("video", start, end)
        return (
            f"audio {audio:4.1f} pkt/s (gap {audio_gap * 1000:4.0f} ms)"
            f" video {video:4.1f} fps (gap {video_gap * 1000:4.0f} ms)"
        )


# -- what the publisher sends (Chromium's getStats) --------------------------------


@dataclass(frozen=True)
class Outbound:
    """Chromium's publish connection over one sampling interval."""

    t: float  # seconds since the phase began, at the end of the interval
    at: float  # time.monotonic() at the end of the interval
    span: float  # the interval, seconds
    video_bps: float  # RTP (payload + header) rate of the video stream, retransmissions included
    rtx_bps: float  # ... of which retransmissions (payload only)
    audio_bps: float
    audio_pps: float
    wire_bps: float  # audio + video, with SRTP/UDP/IP overhead: what the link must carry
    target_bps: float  # the video encoder's target
    available_bps: float  # Chromium's send-side estimate (REMB and loss based)
    size: str  # the encoded frame size
    fps: float  # frames encoded per second
    limitation: str  # qualityLimitationReason
    loss: float  # video fractionLost in the server's last receiver report
    rtt_ms: float

    def __str__(self) -> str:
        return (
            f"{self.t:5.1f}s video {self.video_bps / 1000:4.0f} kbit/s"
            f" (rtx {self.rtx_bps / 1000:3.0f}, target {self.target_bps / 1000:4.0f},"
            f" {self.size} {self.fps:4.1f} fps,"
            f" limited by {self.limitation}) audio {self.audio_bps / 1000:2.0f} kbit/s"
            f" {self.audio_pps:3.0f} pkt/s; wire {self.wire_bps / 1000:4.0f} kbit/s,"
            f" estimate {self.available_bps / 1000:4.0f} kbit/s, loss {self.loss:5.1%},"
            f" rtt {self.rtt_ms:4.0f} ms"
        )


def _rtp_bytes(stats: dict[str, Any] | None) -> float:
    if not stats:
        return 0.0
    return float(stats.get("bytesSent", 0)) + float(stats.get("headerBytesSent", 0))


def _rtx_bytes(stats: dict[str, Any] | None) -> float:
    return float((stats or {}).get("retransmittedBytesSent", 0))


def _packets(stats: dict[str, Any] | None) -> float:
    return float((stats or {}).get("packetsSent", 0))


def outbound(prev: dict[str, Any], cur: dict[str, Any], t: float) -> Outbound:
    span = max(float(cur["at"] - prev["at"]) / 1000, 1e-3)
    video = cur["video"] or {}

    def rate(get: Callable[[dict[str, Any] | None], float], key: str) -> float:
        return (get(cur[key]) - get(prev[key])) / span

    packets = rate(_packets, "video") + rate(_packets, "audio")
    rtp = rate(_rtp_bytes, "video") + rate(_rtp_bytes, "audio")
    frames = float(video.get("framesEncoded", 0)) - float(
        (prev["video"] or {}).get("framesEncoded", 0)
    )
    remote = cur["remote"].get("video", {})
    pair = cur["pair"] or {}
    return Outbound(
        t=t,
        at=time.monotonic(),
        span=span,
        video_bps=8 * rate(_rtp_bytes, "video"),
        rtx_bps=8 * rate(_rtx_bytes, "video"),
        audio_bps=8 * rate(_rtp_bytes, "audio"),
        audio_pps=rate(_packets, "audio"),
        wire_bps=8 * (rtp + WIRE_OVERHEAD_B * packets),
        target_bps=float(video.get("targetBitrate", 0)),
        available_bps=float(pair.get("availableOutgoingBitrate", 0)),
        size=f"{video.get('frameWidth', 0)}x{video.get('frameHeight', 0)}",
        fps=frames / span,
        limitation=str(video.get("qualityLimitationReason", "?")),
        loss=float(remote.get("fractionLost", 0)),
        rtt_ms=1000 * float(remote.get("roundTripTime", 0)),
    )


class Publisher:
    """Samples Chromium's publish connection every STATS_EVERY_S, phase by phase."""

    def __init__(self, page: Page, received: Received) -> None:
        self.page, self.received = page, received
        self.phases: dict[str, list[Outbound]] = {}
        self.began: dict[str, float] = {}
        self._last: dict[str, Any] | None = None

    async def _stats(self) -> dict[str, Any] | None:
        stats: dict[str, Any] | None = await self.page.evaluate(PUBLISH_STATS)
        return stats

    async def phase(
        self, name: str, seconds: float, until: Callable[[Outbound], bool] | None = None
    ) -> list[Outbound]:
        """Sample for ``seconds``, or until a sample satisfies ``until``; the samples."""
        began = self.began[name] = time.monotonic()
        samples = self.phases[name] = []
        self._last = self._last or await self._stats()
        while (elapsed := time.monotonic() - began) < seconds:
            await asyncio.sleep(min(STATS_EVERY_S, seconds - elapsed))
            cur = await self._stats()
            last, self._last = self._last, cur
            if cur is not None and last is not None:
                samples.append(outbound(last, cur, time.monotonic() - began))
                if until is not None and until(samples[-1]):
                    break
        return samples

    def timeline(self) -> str:
        """Each sample, with what the bot received from Chromium over the same second."""
        lines = []
        for name, samples in self.phases.items():
            lines.append(f"-- {name}")
            for s in samples:
                lines.append(
                    f"   {s}\n          bot: {self.received.describe(s.at - s.span, s.at)}"
                )
        return "\n".join(lines)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# -- the test --------------------------------------------------------------------


async def test_a_publisher_on_3g_stays_audible(
    netns: ShapedNamespace, lan_server: KonsiliumServer, publishing_browser: Browser
) -> None:
    server = lan_server
    viewer = Bot(server.url, ROOM, server.mint("viewer", grants=("join", "subscribe")))
    await viewer.start()
    context = await publishing_browser.new_context(
        locale="ru-RU",
        viewport={"width": 1280, "height": 720},
        permissions=["camera", "microphone"],
    )
    await context.add_init_script(TRACK_PEER_CONNECTIONS)
    received: Received | None = None
    publisher: Publisher | None = None
    log: PageLog | None = None

    def why() -> str:
        parts = ["\n--- Chromium's publish connection, each second ---"]
        parts.append(publisher.timeline() if publisher else "(no stats)")
        if received is not None:
            parts.append(
                f"--- bot: {received.count('audio')} audio packets,"
                f" {received.count('video')} video frames from Chromium in all ---"
            )
        parts.append(log.dump() if log else "")
        parts.append(f"\n--- server log tail ---\n{server.log_text()[-6000:]}")
        return "\n".join(parts)

    try:
        page = await context.new_page()
        log = PageLog(page)
        token = server.mint(
            "feldsher", name="Иванова А. П.", clinic="ФАП Лорино", tier="district",
            grants=("join", "publish", "subscribe"),
        )  # fmt: skip
        # from inside the namespace the server is the host end of the veth
        await page.goto(
            f"http://{netns.host_addr}:{server.port}/r/{ROOM}#t={token}",
            wait_until="domcontentloaded",
        )
        pid = await join(page, log, JOIN_S)
        received = Received(viewer, pid)
        received.start()
        publisher = Publisher(page, received)
        arrived = await viewer.wait_until(
            lambda: received.count("audio") > 0 and received.count("video") > 0, JOIN_S
        )
        assert arrived, f"the bot receives nothing from the page{why()}"

        # 1. unshaped: Chromium climbs past what the link will carry
        before = await publisher.phase(
            "unshaped uplink", BASELINE_S, until=lambda s: s.video_bps >= TRY_BPS
        )
        tried = max((s.video_bps for s in before), default=0.0)
        assert tried >= TRY_BPS, (
            f"Chromium sent {tried / 1000:.0f} kbit/s of video at most on an unshaped link"
            f" (want >= {TRY_BPS / 1000:.0f}): the limit would not bite{why()}"
        )
        # 2. the uplink limited to 3g's rate: time to settle, then the measured window
        netns.apply_rate(LINK_BPS, latency_ms=PROFILE.queue_ms, direction="up")
        limited_at = time.monotonic()
        await publisher.phase(f"uplink limited to {LINK_BPS // 1000} kbit/s", CONVERGE_S)
        start = time.monotonic()
        window = await publisher.phase("limited, measured window", WINDOW_S)
        end = time.monotonic()
        await asyncio.sleep(0.1)  # let the poller see the last arrivals of the window
        await received.stop()

        audio_pps, audio_gap = received.window("audio", start, end)
        video_fps, video_gap = received.window("video", start, end)
        _, transient_gap = received.window("audio", limited_at, start)
        transient_pps, _ = received.window("audio", limited_at, start)
        settled = mean([s.video_bps for s in window])
        report = (
            f"\nChromium publishing on a {LINK_BPS // 1000} kbit/s uplink (tbf, queue"
            f" {PROFILE.queue_ms:.0f} ms):"
            f"\n  before the limit: video {tried / 1000:.0f} kbit/s"
            f" (target {before[-1].target_bps / 1000:.0f}, {before[-1].size})"
            f" after {before[-1].t:.0f} s"
            f"\n  the first {CONVERGE_S:.0f} s limited: at the bot, audio"
            f" {transient_pps:.1f} packets/s, longest gap {transient_gap * 1000:.0f} ms"
            f"\n  the last {WINDOW_S:.0f} s: video {settled / 1000:.0f} kbit/s"
            f" (wire, audio included: {mean([s.wire_bps for s in window]) / 1000:.0f} kbit/s);"
            f" at the bot: audio {audio_pps:.1f} packets/s, longest gap {audio_gap * 1000:.0f}"
            f" ms; video {video_fps:.1f} fps, longest gap {video_gap * 1000:.0f} ms"
        )
        print(f"{report}\n--- each second ---\n{publisher.timeline()}")

        # (a) audible: the audio keeps arriving, at its full rate
        assert audio_pps >= AUDIO_SHARE * AUDIO_PPS and audio_gap <= AUDIO_MAX_GAP_S, (
            f"Chromium's audio at the bot: {audio_pps:.1f} packets/s (want"
            f" >= {AUDIO_SHARE * AUDIO_PPS:.1f}), longest gap {audio_gap * 1000:.0f} ms"
            f" (want <= {AUDIO_MAX_GAP_S * 1000:.0f}){report}{why()}"
        )
        # (b) still seen, at whatever rate the link carries
        assert video_fps >= VIDEO_FPS, (
            f"Chromium's video at the bot: {video_fps:.1f} fps (want >= {VIDEO_FPS:.0f})"
            f"{report}{why()}"
        )
        # (c) throttled: Chromium sends no more video than the link carries
        assert settled < LINK_BPS, (
            f"Chromium still sends {settled / 1000:.0f} kbit/s of video into a"
            f" {LINK_BPS // 1000} kbit/s link{report}{why()}"
        )
    finally:
        if received is not None:
            await received.stop()
        await context.close()
        await viewer.stop()
