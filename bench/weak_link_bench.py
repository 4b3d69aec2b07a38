"""Weak-link benchmark (issue 3): one viewer's link goes lan → 3g → satellite → edge → lan.

A 6-party room on a real ``konsilium serve`` process:

* 5 publishers on ``lan`` (audio + video, the pre-encoded clip), spread over
  ``--workers`` bot processes; each also views the 4 others ("good viewers").
  By default they count frames from RTP headers and send no REMB (as in
  ``bench.sfu_bench``): the server's adaptation has no evidence about them and
  keeps them on the originals; ``--good-viewers full`` gives them aiortc's whole
  receive path (REMB, receiver reports) at a higher CPU cost.
* 1 weak viewer in this process that **publishes nothing**.  ``Bot`` cannot
  publish audio without video, and a video uplink on ``edge`` would make its
  own uplink the bottleneck and put a weak publisher in front of the good
  viewers: that is issue 3's separate "weak uplink" case.  The weak viewer's
  RTCP (REMB, receiver reports, NACKs) still travels up the emulated link.
  Both its connections share one :class:`LinkEmulator` whose profile is
  switched every ``--phase-seconds``.

Each mode (``adaptive``, then ``off`` = ``konsilium serve --adaptation off``,
originals only) runs in a fresh server.  Per phase, for the weak viewer:

* **video kbit/s**: VP8 frame payload bytes received (``ReceivedTrack.bytes``,
  no RTP/SRTP/UDP headers) x 8 / phase length, against the profile's rate; **link
  kbit/s** is everything the emulator delivered downstream (UDP payloads: audio,
  video, RTX, RTCP, SRTP overhead);
* **estimate kbit/s**: the median of the server's estimate for the weak viewer
  (``estimates`` of the media endpoint, polled every 0.5 s);
* **fps**: complete video frames received per second, all publishers together;
* **freeze**: share of 100 ms ticks at which no new video frame from *any*
  publisher had arrived for more than 500 ms; "conv." counts only the ticks after
  the phase converged.  Per publisher, the same for that publisher's video alone
  (a video the allocator paused counts as frozen);
* **audio loss**: per publisher, the audio packets the publisher *sent during
  the phase* (by send time, recovered from the RTP timestamps: the publisher
  sends one packet per 20 ms) that never reached the weak viewer, over all 5
  publishers.  Counted where the link hands packets to the client (the RTP
  header is in clear under SRTP), i.e. what a browser's jitter buffer would get;
  "aiortc JB" is the same after aiortc's audio jitter buffer, which loses
  several times more (see :class:`WeakViewer`), for information (originals only).
  While the server sends the weak viewer one audio *mix* (``audio_mode``), a mix
  frame of 40/60 ms that arrives counts for every mixed publisher's 20 ms slots
  it covers, and a lost one against them (:mod:`bench.audio_seen`); **audio mix**
  is the share of the phase spent mixing, **end audio** the mode at its end.  Nothing is
  ignored: the first seconds after a change count.  A packet sent late in a
  phase and delivered in the next counts for the phase it was sent in.
  **audio hole** is the longest run of consecutive lost audio packets (ms),
  **audio gap** the longest time without any audio packet from a publisher
  arriving; audio counts as *interrupted* when either exceeds 200 ms of lost
  audio or 500 ms of silence.  **srv audio drops**: audio the server's
  DownTracks for the weak viewer dropped;
* **converge**: from the media endpoint's ``layers`` (polled every 0.5 s): the
  start of the first 3 s window without a layer change that begins at a layer
  change.  A phase without any layer change converged at 0 s, except a drop met
  on the originals or a recovery met off them: "—", it never reacted.
  ``changes`` is how many layer changes the phase saw, ``last`` the time of the
  last one;
* **end layers**: the layers at the end of the phase; **originals back**: on a
  ``lan`` phase, when every video was back on the original for good;
* **server CPU** (% of one core, ladders included), **ladder CPU** (all ladders'
  worker threads) and **others' CPU**: what processes outside the benchmark used
  during the phase (the machine is shared: a high figure taints the phase).

For the good viewers: video frames delivered / sent over the whole run (every
publisher→viewer pair, capped per pair at what was sent).  Ladder CPU per
publisher: the ladder's worker CPU seconds (``ladders[track].cpu_s``) over the
run / run length, as % of one core.

``--trace FILE`` writes, every 0.5 s and per mode, the weak viewer's layers,
estimate (with what made the last cut), round trips as the queue judge sees
them (floor, newest sample, new links), video copies, frames, the
emulated link's backlog and the audio mixer's skips to ``FILE.<mode>.jsonl``.

    python -m bench.weak_link_bench --phase-seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from media_server.bot import Bot
from media_server.clip import Clip, load_clip
from media_server.linkemu import Fate, LinkEmulator, get_profile
from media_server.linkemu.emulator import Address, Deliver
from media_server.packet import MediaPacket

from .audio_seen import (
    AudioSeen,
    LinkAudio,
    append_ts,
    mix_timestamp_jumps,
    opus_duration_ms,
    phase_audio,
    split_audio,
)
from .cpu import process_cpu_seconds
from .server import KonsiliumServer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOM = "weak"
ADMIN_KEY = "test-admin-key"
PUBLISHERS = 5
TICK_S = 0.1
FREEZE_S = 0.5
STABLE_S = 3.0
LAYER_POLL_S = 0.5
AUDIO_HOLE_LIMIT_MS = 200.0
AUDIO_GAP_LIMIT_MS = 500.0
DEFAULT_PHASES = ("lan", "3g", "satellite", "edge", "lan")

# issue 3 targets
CONVERGE_DROP_S = 5.0
CONVERGE_RECOVERY_S = 15.0
FREEZE_TARGET = 0.01
AUDIO_LOSS_TARGET = 0.005
GOOD_VIEWERS_TARGET = 0.98
CLEAR_RATIO = 2.0


# -- publishers / good viewers in worker processes ------------------------------


@dataclass(frozen=True)
class PublisherSpec:
    url: str
    sub: str
    token: str
    light: bool


def _worker_main(conn: Connection) -> None:
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_worker(conn))


async def _worker(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    clip = await loop.run_in_executor(None, load_clip)
    bots: dict[str, Bot] = {}
    while True:
        command, arg = await loop.run_in_executor(None, conn.recv)
        if command == "join":
            spec: PublisherSpec = arg
            bot = Bot(
                spec.url,
                ROOM,
                spec.token,
                clip=clip,
                audio=True,
                remb=not spec.light,
                light=spec.light,
            )
            await bot.start()
            bots[spec.sub] = bot
            conn.send(bot.id)
        elif command == "snapshot":
            conn.send(
                {
                    sub: {
                        "video_sent": bot.sent("video"),
                        "audio_sent": bot.sent("audio"),
                        "video_received": {
                            pid: t.frames
                            for (pid, kind), t in bot.stats.received.items()
                            if kind == "video"
                        },
                    }
                    for sub, bot in bots.items()
                }
            )
        elif command == "stop":
            for bot in bots.values():
                with contextlib.suppress(Exception):
                    await bot.stop()
            conn.send(None)
            return


class Workers:
    """Publisher bots spread round-robin over ``count`` processes."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)
        self._joined = 0
        self._lock = asyncio.Lock()

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    async def _call(self, pipe: Connection, command: str, arg: Any = None) -> Any:
        async with self._lock:  # one request per pipe at a time, answers in order
            pipe.send((command, arg))
            return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)

    async def join(self, spec: PublisherSpec) -> str:
        pipe = self._pipes[self._joined % len(self._pipes)]
        self._joined += 1
        return str(await self._call(pipe, "join", spec))

    async def snapshot(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for pipe in self._pipes:
            merged.update(await self._call(pipe, "snapshot"))
        return merged

    async def stop(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(pipe, "stop"), 20)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# -- the weak viewer --------------------------------------------------------------


class WeakViewer(Bot):
    """A Bot that also keeps each audio packet's arrival time and RTP timestamp, twice:

    * ``audio_link``: as the link delivers it to the client (SRTP leaves the RTP header
      in clear), before aiortc's receiver: what a browser's jitter buffer would get;
      with its send time (when it reached the emulator, over loopback from the server),
      to tell originals from the server's mix (``audio_events``: the ``audio_mode``
      messages; see :mod:`bench.audio_seen`);
    * ``audio``: the 20 ms originals as aiortc's receiver hands them on.  aiortc's audio
      jitter buffer (16 packets, prefetch 4) turns each hole into a standing backlog and
      then evicts *received* packets when the next hole comes, so it loses several times
      the link's loss; reported for information only (mix periods excluded).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audio: dict[str, list[tuple[float, int]]] = {}  # pid -> (arrival, unwrapped ts)
        self.audio_link: list[LinkAudio] = []
        self.audio_events: list[tuple[float, dict[str, Any]]] = []  # (monotonic, audio_mode)
        if self.link is not None:
            self._tap(self.link)

    async def _handle(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "audio_mode":
            wall = float(msg.get("server_time") or time.time())
            self.audio_events.append((time.monotonic() - (time.time() - wall), msg))
        await super()._handle(msg)

    def seen(self) -> tuple[AudioSeen, AudioSeen]:
        """(at the link, after aiortc's jitter buffer) audio, originals and mixes."""
        link = split_audio(self.audio_link, self.audio_events)
        app = AudioSeen(self.audio, [], link.mixed)
        return link, app

    def _tap(self, link: LinkEmulator) -> None:
        real_send = link.down.send

        def send(data: bytes, addr: Address = None, deliver: Deliver | None = None) -> Fate:
            if deliver is None:
                return real_send(data, addr)
            target = deliver
            entered = time.monotonic()  # the server sent it just now (loopback)

            def tapped(d: bytes, a: Address) -> None:
                self._note_rtp(d, entered)
                target(d, a)

            return real_send(data, addr, tapped)

        link.down.send = send  # type: ignore[method-assign]  # this emulator instance only

    def _note_rtp(self, data: bytes, sent: float) -> None:
        if len(data) < 12 or not 128 <= data[0] < 192 or 64 <= (data[1] & 0x7F) <= 95:
            return  # not RTP (STUN, DTLS, RTCP)
        mid = self._ssrc_mid.get(int.from_bytes(data[8:12], "big"))  # Bot: media SSRC -> mid
        info = self.mids.get(mid) if mid is not None else None
        if mid is not None and info is not None and info["kind"] == "audio":
            ts = int.from_bytes(data[4:8], "big")
            self.audio_link.append(
                LinkAudio(time.monotonic(), sent, mid, info["participant_id"], ts)
            )

    async def _consume(self, mid: str, track: MediaStreamTrack) -> None:
        # Bot._consume, plus the audio timestamps (the passthrough receiver gives the
        # RTP timestamp as pts)
        try:
            while True:
                item = await track.recv()
                if not isinstance(item, MediaPacket):
                    continue
                self._count_frame(mid, len(bytes(item)), item.keyframe)
                if item.kind == "audio" and opus_duration_ms(item.data) == 20:
                    self._note_audio(mid, int(item.pts))  # an original (the mix: 40/60 ms)
        except MediaStreamError:
            pass

    def _note_audio(self, mid: str, ts: int) -> None:
        info = self.mids.get(mid)
        if info is not None:
            append_ts(self.audio.setdefault(info["participant_id"], []), ts, time.monotonic())


# -- sampling ---------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    video_frames: dict[str, int]
    video_bytes: dict[str, int]
    last_video: dict[str, float | None]
    down_bytes: int
    down_dropped_queue: int
    down_dropped_loss: int


def take_sample(viewer: Bot, link: LinkEmulator, pids: Sequence[str]) -> Sample:
    frames: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    last: dict[str, float | None] = {}
    for pid in pids:
        track = viewer.stats.received.get((pid, "video"))
        frames[pid] = track.frames if track else 0
        nbytes[pid] = track.bytes if track else 0
        last[pid] = track.last_frame_at if track else None
    down = link.stats().down
    return Sample(
        time.monotonic(), frames, nbytes, last, down.bytes, down.dropped_queue, down.dropped_loss
    )


@dataclass
class Boundary:
    t: float
    sample: Sample
    ladders: dict[str, Any]
    weak_slots: list[dict[str, Any]]
    server_cpu_s: float
    machine_busy_s: float  # all CPUs, every process
    own_cpu_s: float  # server + publisher workers + this process


@dataclass
class PhaseResult:
    profile: str
    seconds: float
    link_kbps: float | None
    video_kbps: float
    link_down_kbps: float
    queue_drops: int
    fps: float
    freeze: float
    freeze_converged: float | None
    freeze_per_pub: list[float]
    audio_loss: float
    audio_loss_per_pub: list[float]
    audio_loss_app: float  # after aiortc's audio jitter buffer (information only)
    audio_hole_ms: float
    audio_gap_ms: float
    converge_s: float | None
    originals_s: float | None  # lan phases: every video back on the original from then on
    server_audio_drops: int  # audio packets the weak viewer's DownTracks dropped (server)
    changes: int
    last_change_s: float | None
    end_layers: dict[str, str]
    server_cpu: float
    ladder_cpu: float
    other_cpu: float  # % of a core used by processes outside the benchmark (noise)
    mix_share: float = 0.0  # share of the phase the weak viewer got one audio mix
    end_audio: str = ""  # "originals" or "mix <format> x<copies>" at the end of the phase
    estimate_kbps: float | None = None  # the server's estimate for the weak viewer (median)

    @property
    def audio_interrupted(self) -> bool:
        return self.audio_hole_ms > AUDIO_HOLE_LIMIT_MS or self.audio_gap_ms > AUDIO_GAP_LIMIT_MS


@dataclass
class ModeResult:
    mode: str
    phase_seconds: float
    phases: list[PhaseResult]
    good_delivered: int
    good_expected: int
    good_worst_pair: float
    ladder_cpu_per_pub: dict[str, float]
    audio_sent_total: int
    run_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def good_ratio(self) -> float:
        return self.good_delivered / self.good_expected if self.good_expected else 0.0


async def media_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with session.get(f"{url}/api/rooms/{ROOM}/media", headers=headers) as resp:
        data: dict[str, Any] = await resp.json()
        return data


# -- analysis ---------------------------------------------------------------------


def convergence(
    series: Sequence[tuple[float, dict[str, str]]], t0: float, t1: float, direction: str
) -> tuple[float | None, int, float | None]:
    """(seconds to converge or None, layer changes in the phase, last change after t0).

    Converged: the first 3 s without a layer change that starts at a layer change.  A
    phase without any layer change converged at once (0 s), except a drop met on the
    originals or a recovery met off them: nothing reacted (None).
    """
    before = [layers for t, layers in series if t < t0]
    previous = before[-1] if before else None
    changes: list[float] = []
    for t, layers in series:
        if t < t0 or t > t1:
            continue
        if previous is not None and layers != previous:
            changes.append(t)
        previous = layers
    last = changes[-1] - t0 if changes else None
    if not changes:
        on_originals = not previous or all(v == "original" for v in previous.values())
        stuck = (direction == "drop" and on_originals) or (
            direction == "recovery" and not on_originals
        )
        return (None if stuck else 0.0), 0, None
    for i, c in enumerate(changes):
        following = changes[i + 1] if i + 1 < len(changes) else math.inf
        if following - c >= STABLE_S and c + STABLE_S <= t1:
            return c - t0, len(changes), last
    return None, len(changes), last


def originals_at(
    series: Sequence[tuple[float, dict[str, str]]], t0: float, t1: float, videos: int
) -> float | None:
    """Seconds after t0 from which every video is on the original until t1 (None: never)."""
    since: float | None = None
    for t, layers in series:
        if t < t0 or t > t1:
            continue
        full = len(layers) >= videos and all(v == "original" for v in layers.values())
        if full and since is None:
            since = t
        elif not full:
            since = None
    return None if since is None else since - t0


def freeze_ratio(ticks: Sequence[Sample], pids: Sequence[str] | None = None) -> float:
    if not ticks:
        return 0.0
    frozen = 0
    for s in ticks:
        lasts = [s.last_video[p] for p in (pids or list(s.last_video))]
        seen = [x for x in lasts if x is not None]
        if not seen or s.t - max(seen) > FREEZE_S:
            frozen += 1
    return frozen / len(ticks)


def machine_busy_s() -> float:
    """CPU seconds all processes have used so far, all CPUs (from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def _direction(before: str | None, after: str) -> str:
    """ "drop", "recovery" or "same": how the link's rate changed (None rate = unlimited)."""
    if before is None:
        return "same"
    old, new = get_profile(before).rate_bps, get_profile(after).rate_bps
    old_rate, new_rate = old or math.inf, new or math.inf
    return "drop" if new_rate < old_rate else "recovery" if new_rate > old_rate else "same"


def _audio_drops(slots: Sequence[dict[str, Any]]) -> int:
    return sum(
        int(x.get("dropped", 0)) for x in slots if str(x.get("track") or "").endswith(":microphone")
    )


def analyse_phase(
    profile: str,
    previous_profile: str | None,
    b0: Boundary,
    b1: Boundary,
    ticks: Sequence[Sample],
    layer_series: Sequence[tuple[float, dict[str, str]]],
    audio: AudioSeen,
    audio_app: AudioSeen,
    pids: Sequence[str],
    adaptive: bool,
    estimate_series: Sequence[tuple[float, dict[str, Any]]] = (),
) -> PhaseResult:
    t0, t1 = b0.t, b1.t
    dur = t1 - t0
    s0, s1 = b0.sample, b1.sample
    rate = get_profile(profile).rate_bps
    video_bytes = sum(s1.video_bytes[p] - s0.video_bytes[p] for p in pids)
    frames = sum(s1.video_frames[p] - s0.video_frames[p] for p in pids)
    in_phase = [s for s in ticks if t0 < s.t <= t1]
    conv, changes, last_change = (
        convergence(layer_series, t0, t1, _direction(previous_profile, profile))
        if adaptive
        else (None, 0, None)
    )
    back = originals_at(layer_series, t0, t1, len(pids)) if adaptive and rate is None else None
    srv_audio_drops = _audio_drops(b1.weak_slots) - _audio_drops(b0.weak_slots)
    after = [s for s in in_phase if s.t >= t0 + conv] if conv is not None else None
    audio_loss, per_pub_loss, hole, gap = phase_audio(audio, pids, t0, t1)
    app_loss, _, _, _ = phase_audio(audio_app, pids, t0, t1)
    end_layers = dict(layer_series[-1][1]) if layer_series else {}
    for t, layers in layer_series:
        if t <= t1:
            end_layers = dict(layers)
    ladder_cpu = sum(
        float(b1.ladders.get(k, {}).get("cpu_s", 0.0)) - float(v.get("cpu_s", 0.0))
        for k, v in b0.ladders.items()
    ) + sum(float(v.get("cpu_s", 0.0)) for k, v in b1.ladders.items() if k not in b0.ladders)
    return PhaseResult(
        profile=profile,
        seconds=dur,
        link_kbps=rate / 1000 if rate else None,
        video_kbps=video_bytes * 8 / dur / 1000,
        link_down_kbps=(s1.down_bytes - s0.down_bytes) * 8 / dur / 1000,
        queue_drops=s1.down_dropped_queue - s0.down_dropped_queue,
        fps=frames / dur,
        freeze=freeze_ratio(in_phase),
        freeze_converged=freeze_ratio(after) if after is not None else None,
        freeze_per_pub=[freeze_ratio(in_phase, [p]) for p in pids],
        audio_loss=audio_loss,
        audio_loss_per_pub=per_pub_loss,
        audio_loss_app=app_loss,
        audio_hole_ms=hole,
        audio_gap_ms=gap,
        converge_s=conv,
        originals_s=back,
        server_audio_drops=srv_audio_drops,
        changes=changes,
        last_change_s=last_change,
        end_layers=end_layers if adaptive else {},
        server_cpu=100 * (b1.server_cpu_s - b0.server_cpu_s) / dur,
        other_cpu=100
        * ((b1.machine_busy_s - b0.machine_busy_s) - (b1.own_cpu_s - b0.own_cpu_s))
        / dur,
        ladder_cpu=100 * ladder_cpu / dur,
        mix_share=audio.mix_share(t0, t1),
        end_audio=audio.mode_at(t1 - 0.01),
        estimate_kbps=_median_estimate(estimate_series, t0, t1),
    )


def _median_estimate(
    series: Sequence[tuple[float, dict[str, Any]]], t0: float, t1: float
) -> float | None:
    values = [
        float(e["estimate_bps"]) / 1000
        for t, e in series
        if t0 < t <= t1 and isinstance(e.get("estimate_bps"), int | float)
    ]
    return statistics.median(values) if values else None


# -- one mode ---------------------------------------------------------------------


async def run_mode(
    mode: str, phases: Sequence[str], phase_s: float, args: argparse.Namespace, clip: Clip
) -> ModeResult:
    adaptive = mode == "adaptive"
    data_dir = Path(tempfile.mkdtemp(prefix=f"konsilium-weak-{mode}-"))
    extra = ("--adaptation", "on" if adaptive else "off", "--log-level", "WARNING")
    link = LinkEmulator(get_profile(phases[0]), seed=args.seed, name="weak")
    trace: list[str] | None = [] if args.trace is not None else None
    with KonsiliumServer(data_dir, extra_args=extra) as srv:
        workers = Workers(args.workers)
        viewer: WeakViewer | None = None
        session = aiohttp.ClientSession()
        try:
            subs = [f"pub-{i}" for i in range(PUBLISHERS)]
            pids = []
            for sub in subs:
                spec = PublisherSpec(
                    srv.url, sub, srv.mint(sub, room=ROOM), args.good_viewers == "light"
                )
                pids.append(await workers.join(spec))
            viewer = WeakViewer(
                srv.url, ROOM, srv.mint("weak", room=ROOM), clip=clip, publish=False, link=link
            )
            await viewer.start()
            deadline = time.monotonic() + 30
            while True:
                snap = await workers.snapshot()
                good_ok = all(
                    snap[s]["video_received"].get(p, 0) > 0
                    for s, me in zip(subs, pids, strict=True)
                    for p in pids
                    if p != me
                )
                weak_ok = all(viewer.stats.frames_from(p, "video") > 0 for p in pids)
                weak_ok = weak_ok and all(viewer.stats.frames_from(p, "audio") > 0 for p in pids)
                if good_ok and weak_ok:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{mode}: not everyone received everyone within 30 s")
                await asyncio.sleep(0.2)
            await asyncio.sleep(args.settle)

            ticks: list[Sample] = []
            layer_series: list[tuple[float, dict[str, str]]] = []
            estimate_series: list[tuple[float, dict[str, Any]]] = []
            stop = asyncio.Event()
            t_zero = time.monotonic()

            async def sampler() -> None:
                assert viewer is not None
                loop = asyncio.get_running_loop()
                next_at = loop.time()
                while not stop.is_set():
                    ticks.append(take_sample(viewer, link, pids))
                    next_at += TICK_S
                    await asyncio.sleep(max(0.0, next_at - loop.time()))

            async def poller() -> None:
                while not stop.is_set():
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                        stats = await media_stats(session, srv.url)
                        now = time.monotonic()
                        layers = dict(stats.get("layers", {}).get("weak", {}))
                        layer_series.append((now, layers))
                        estimate = stats.get("estimates", {}).get("weak")
                        if isinstance(estimate, dict):
                            estimate_series.append((now, estimate))
                        if trace is not None:
                            line = {"t": round(now - t_zero, 2), "profile": link.profile.name}
                            copies = stats.get("video_copies", {}).get("weak")
                            line.update(layers=layers, estimate=estimate, copies=copies)
                            line["round_trip"] = stats.get("round_trips", {}).get("weak")
                            backlog = link.down.model.backlog(asyncio.get_running_loop().time())
                            down = link.stats().down
                            frames = {
                                p: t.frames
                                for (p, kind), t in viewer.stats.received.items()
                                if kind == "video"
                            }
                            line.update(
                                frames=frames,
                                backlog_ms=round(1000 * backlog),
                                queue_drops=down.dropped_queue,
                                lost=down.dropped_loss,
                                mix_skips=stats.get("audio_mix", {}).get("skips"),
                            )
                            trace.append(json.dumps(line) + "\n")
                    await asyncio.sleep(LAYER_POLL_S)

            async def boundary() -> Boundary:
                assert viewer is not None
                sample = take_sample(viewer, link, pids)
                cpu = process_cpu_seconds(srv.pid)
                own = cpu + process_cpu_seconds() + sum(map(process_cpu_seconds, workers.pids))
                stats: dict[str, Any] = {"ladders": {}, "subscribers": {}}
                for _ in range(3):
                    try:
                        stats = await media_stats(session, srv.url)
                        break
                    except (aiohttp.ClientError, TimeoutError, ValueError):
                        await asyncio.sleep(0.1)
                slots = list(stats.get("subscribers", {}).get("weak", []))
                return Boundary(
                    sample.t,
                    sample,
                    dict(stats.get("ladders", {})),
                    slots,
                    cpu,
                    machine_busy_s(),
                    own,
                )

            snap0 = await workers.snapshot()
            tasks = [asyncio.ensure_future(sampler()), asyncio.ensure_future(poller())]
            bounds: list[Boundary] = []
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, profile in enumerate(phases):
                link.set_profile(profile)
                bounds.append(await boundary())
                print(f"  [{mode}] phase {i + 1}/{len(phases)}: {profile}", flush=True)
                await asyncio.sleep(max(0.0, start + (i + 1) * phase_s - loop.time()))
            bounds.append(await boundary())
            snap1 = await workers.snapshot()
            await asyncio.sleep(1.5)  # audio sent at the very end still arrives (lan)
            stop.set()
            await asyncio.gather(*tasks)

            seen, seen_app = viewer.seen()
            results = [
                analyse_phase(
                    profile,
                    phases[i - 1] if i else None,
                    bounds[i],
                    bounds[i + 1],
                    ticks,
                    layer_series,
                    seen,
                    seen_app,
                    pids,
                    adaptive,
                    estimate_series,
                )
                for i, profile in enumerate(phases)
            ]
            delivered = expected = 0
            worst = 1.0
            for s, me in zip(subs, pids, strict=True):
                for ps, p in zip(subs, pids, strict=True):
                    if p == me:
                        continue
                    sent = int(snap1[ps]["video_sent"]) - int(snap0[ps]["video_sent"])
                    got = int(snap1[s]["video_received"].get(p, 0)) - int(
                        snap0[s]["video_received"].get(p, 0)
                    )
                    got = min(got, sent)
                    delivered += got
                    expected += sent
                    worst = min(worst, got / sent if sent else 1.0)
            run_s = bounds[-1].t - bounds[0].t
            ladder_cpu = {
                p: 100
                * (
                    float(bounds[-1].ladders.get(f"{p}:camera", {}).get("cpu_s", 0.0))
                    - float(bounds[0].ladders.get(f"{p}:camera", {}).get("cpu_s", 0.0))
                )
                / run_s
                for p in pids
            }
            audio_sent = sum(
                int(snap1[s]["audio_sent"]) - int(snap0[s]["audio_sent"]) for s in subs
            )
            notes = [
                f"mix timestamps jumped {jump:+.3f} s at t={sent - bounds[0].t:.1f} s"
                f" ({segment.name})"
                for segment in seen.segments
                for sent, jump in mix_timestamp_jumps(segment)
            ]
            return ModeResult(
                mode,
                phase_s,
                results,
                delivered,
                expected,
                worst,
                ladder_cpu,
                audio_sent,
                run_s,
                notes,
            )
        finally:
            if viewer is not None:
                await viewer.stop()
            await session.close()
            await workers.stop()
            link.close()
            if trace is not None:
                path = Path(f"{args.trace}.{mode}.jsonl")
                await asyncio.to_thread(path.write_text, "".join(trace), encoding="utf-8")


# -- printing ---------------------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _times(ratio: float) -> str:
    return "∞×" if math.isinf(ratio) else f"{ratio:.1f}×"


def _layers(layers: dict[str, str], adaptive: bool) -> str:
    if not adaptive:
        return "—"
    counts = Counter(layers.values())
    counts["original"] += PUBLISHERS - len(layers)  # tracks never switched: the original
    return " ".join(f"{name}×{n}" for name, n in sorted(counts.items()) if n > 0)


def _table(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def mode_lines(r: ModeResult) -> list[str]:
    heads = [
        "phase",
        "link kbit/s",
        "estimate kbit/s",
        "video kbit/s",
        "link use kbit/s",
        "queue drops",
        "fps",
        "freeze %",
        "freeze conv. %",
        "freeze per pub %",
        "audio loss %",
        "audio loss aiortc JB %",
        "audio mix %",
        "end audio",
        "audio hole ms",
        "audio gap ms",
        "srv audio drops",
        "converge s",
        "originals back s",
        "changes",
        "last change s",
        "end layers",
        "server CPU %",
        "ladder CPU %",
        "others' CPU %",
    ]
    rows = []
    for p in r.phases:
        rows.append(
            [
                p.profile,
                "∞" if p.link_kbps is None else f"{p.link_kbps:.0f}",
                "—" if p.estimate_kbps is None else f"{p.estimate_kbps:.0f}",
                f"{p.video_kbps:.0f}",
                f"{p.link_down_kbps:.0f}",
                str(p.queue_drops),
                f"{p.fps:.1f}",
                _pct(p.freeze),
                _pct(p.freeze_converged),
                "/".join(f"{100 * x:.0f}" for x in p.freeze_per_pub),
                _pct(p.audio_loss, 2),
                _pct(p.audio_loss_app, 1),
                _pct(p.mix_share, 0),
                p.end_audio or "—",
                f"{p.audio_hole_ms:.0f}",
                f"{p.audio_gap_ms:.0f}",
                str(p.server_audio_drops),
                "—" if p.converge_s is None else f"{p.converge_s:.1f}",
                "—" if p.originals_s is None else f"{p.originals_s:.1f}",
                str(p.changes),
                "—" if p.last_change_s is None else f"{p.last_change_s:.1f}",
                _layers(p.end_layers, r.mode == "adaptive"),
                f"{p.server_cpu:.0f}",
                f"{p.ladder_cpu:.1f}",
                f"{p.other_cpu:.0f}",
            ]
        )
    lines = [f"### mode: {r.mode} ({r.phase_seconds:.0f} s phases)", ""]
    lines += _table(heads, rows)
    ladder = ", ".join(f"{p}: {v:.2f} %" for p, v in r.ladder_cpu_per_pub.items())
    lines += [
        "",
        f"good viewers: {r.good_delivered}/{r.good_expected} frames = {100 * r.good_ratio:.2f} %"
        f" (worst pair {100 * r.good_worst_pair:.2f} %)",
        f"ladder CPU per publisher (% of a core over {r.run_seconds:.0f} s): {ladder or '—'}",
        *(f"note: {n}" for n in r.notes),
    ]
    return lines


def comparison_lines(adaptive: ModeResult, off: ModeResult) -> list[str]:
    heads = [
        "phase",
        "video kbit/s a / off",
        "fps a / off",
        "freeze % a / off",
        "audio loss % a / off",
        "audio hole ms a / off",
    ]
    rows = []
    for a, o in zip(adaptive.phases, off.phases, strict=True):
        rows.append(
            [
                a.profile,
                f"{a.video_kbps:.0f} / {o.video_kbps:.0f}",
                f"{a.fps:.1f} / {o.fps:.1f}",
                f"{_pct(a.freeze)} / {_pct(o.freeze)}",
                f"{_pct(a.audio_loss, 2)} / {_pct(o.audio_loss, 2)}",
                f"{a.audio_hole_ms:.0f} / {o.audio_hole_ms:.0f}",
            ]
        )
    rows.append(
        [
            "good viewers",
            "",
            "",
            "",
            "",
            f"frames {100 * adaptive.good_ratio:.2f} % / {100 * off.good_ratio:.2f} %",
        ]
    )
    return ["### adaptive vs off", "", *_table(heads, rows)]


def targets(adaptive: ModeResult, off: ModeResult | None) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    phases = adaptive.phases
    for i, p in enumerate(phases):
        if i == 0:
            continue
        kind = _direction(phases[i - 1].profile, p.profile)
        if kind == "same":
            continue
        limit = CONVERGE_DROP_S if kind == "drop" else CONVERGE_RECOVERY_S
        got = "never" if p.converge_s is None else f"{p.converge_s:.1f} s"
        ok = p.converge_s is not None and p.converge_s <= limit
        if p.link_down_kbps < 1:  # the layers of a viewer that receives nothing mean nothing
            got, ok = f"layers: {got}; but no media reached the viewer", False
        out.append((f"converge ≤ {limit:.0f} s after {kind} → {p.profile}", got, ok))
    for p in phases:
        if p.profile in ("3g", "satellite"):
            value = p.freeze_converged if p.freeze_converged is not None else p.freeze
            label = "" if p.freeze_converged is not None else " (never converged: whole phase)"
            out.append(
                (
                    f"freeze ≤ 1 % on {p.profile} once converged",
                    f"{_pct(value)} %{label}",
                    value <= FREEZE_TARGET,
                )
            )
        if p.profile == "satellite":
            out.append(
                (
                    "audio loss ≤ 0.5 % on satellite",
                    f"{_pct(p.audio_loss, 2)} %",
                    p.audio_loss <= AUDIO_LOSS_TARGET,
                )
            )
        if p.profile == "edge":
            out.append(
                (
                    "audio never interrupted on edge",
                    f"longest hole {p.audio_hole_ms:.0f} ms, longest silence "
                    f"{p.audio_gap_ms:.0f} ms, loss {_pct(p.audio_loss, 1)} %",
                    not p.audio_interrupted,
                )
            )
    out.append(
        (
            "good viewers ≥ 98 % of frames",
            f"{100 * adaptive.good_ratio:.2f} %",
            adaptive.good_ratio >= GOOD_VIEWERS_TARGET,
        )
    )
    if off is not None:
        parts = []
        ok = True
        for a, o in zip(adaptive.phases, off.phases, strict=True):
            if a.profile in ("3g", "satellite"):
                ratio = a.fps / o.fps if o.fps > 0 else math.inf
                parts.append(f"fps {a.profile} {_times(ratio)}")
                ok = ok and ratio >= CLEAR_RATIO
            if a.profile in ("satellite", "edge"):
                ratio = o.audio_loss / a.audio_loss if a.audio_loss > 0 else math.inf
                parts.append(f"audio loss {a.profile} {_times(ratio)} lower")
                ok = ok and (ratio >= CLEAR_RATIO or o.audio_loss <= AUDIO_LOSS_TARGET)
        out.append(
            (
                "clear ratio over off (≥ 2× fps on 3g/satellite, ≤ ½ audio loss on satellite/edge)",
                ", ".join(parts),
                ok,
            )
        )
    return out


def report(results: list[ModeResult]) -> list[str]:
    lines: list[str] = []
    for r in results:
        lines += [*mode_lines(r), ""]
    by_mode = {r.mode: r for r in results}
    adaptive, off = by_mode.get("adaptive"), by_mode.get("off")
    if adaptive is not None and off is not None:
        lines += [*comparison_lines(adaptive, off), ""]
    if adaptive is not None:
        rows = [
            [what, got, "met" if ok else "**missed**"] for what, got, ok in targets(adaptive, off)
        ]
        lines += ["### targets (adaptive)", "", *_table(["target", "measured", ""], rows)]
    return lines


def load_results(path: Path) -> list[ModeResult]:
    results = []
    for raw in json.loads(path.read_text(encoding="utf-8")):
        phases = [PhaseResult(**ph) for ph in raw.pop("phases")]
        results.append(ModeResult(phases=phases, **raw))
    return results


async def main_async(args: argparse.Namespace) -> list[ModeResult]:
    clip = await asyncio.get_running_loop().run_in_executor(None, load_clip)
    print(
        f"clip: {clip.width}x{clip.height} {clip.fps} fps, {clip.video_bitrate / 1000:.0f} kbit/s "
        f"video + Opus; {PUBLISHERS} publishers on lan, 1 weak viewer (publishes nothing); "
        f"phases {' → '.join(args.phases)}, {args.phase_seconds:.0f} s each; "
        f"good viewers {args.good_viewers}",
        flush=True,
    )
    results = []
    for mode in args.modes:
        print(f"running mode {mode} ...", flush=True)
        result = await run_mode(mode, args.phases, args.phase_seconds, args, clip)
        results.append(result)
        print("\n".join(mode_lines(result)), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--phase-seconds", type=float, default=60.0)
    parser.add_argument(
        "--modes", nargs="+", choices=["adaptive", "off"], default=["adaptive", "off"]
    )
    parser.add_argument("--phases", nargs="+", default=list(DEFAULT_PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--good-viewers", choices=["light", "full"], default="light")
    parser.add_argument("--workers", type=int, default=2, help="publisher bot processes")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before the first phase")
    parser.add_argument("--seed", type=int, default=3, help="link emulator seed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--trace",
        type=Path,
        help="write the weak viewer's layers and estimate every 0.5 s to TRACE.<mode>.jsonl",
    )
    parser.add_argument("--report-json", type=Path, help="only print the report of a --json file")
    args = parser.parse_args(argv)
    if args.report_json:
        print("\n".join(report(load_results(args.report_json))))
        return 0
    for name in args.phases:
        get_profile(name)
    logging.basicConfig(level=logging.ERROR)
    results = asyncio.run(main_async(args))
    print()
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
