"""A headless participant: joins with a token, publishes a clip, counts what it receives.

Publishing replays packets (no encoding at run time), receiving counts packets
(no decoding), so one 2-core machine runs a dozen bots.  Tests and benchmarks
use :class:`Bot` directly; ``konsilium bot`` runs one from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from . import hooks
from .clip import Clip, load_clip
from .linkemu import LinkEmulator, attach_to_peer_connection
from .packet import MediaPacket
from .rtc import prefer_forwardable_codecs, rtc_configuration

logger = logging.getLogger(__name__)


class BotError(Exception):
    """The server refused or dropped the bot (carries the protocol error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ClipTrack(MediaStreamTrack):
    """Replays a clip's packets in real time, looping; jumps to a keyframe on request."""

    def __init__(self, kind: str, packets: Sequence[MediaPacket], interval_s: float, step: int):
        super().__init__()
        self.kind = kind
        self._packets = packets
        self._interval = interval_s
        self._step = step  # pts increment per packet
        self._keyframes = [i for i, p in enumerate(packets) if p.keyframe] or [0]
        self._index = 0  # frames sent so far (drives pts and pacing)
        self._position = 0  # position in the clip
        self._start: float | None = None
        self._keyframe_wanted = False
        self.sent = 0
        self.keyframes_sent = 0
        self.keyframe_requests = 0

    def request_keyframe(self) -> None:
        self.keyframe_requests += 1
        self._keyframe_wanted = True

    async def recv(self) -> Any:  # a MediaPacket; aiortc's annotation says Frame | Packet
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self._index * self._interval
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._keyframe_wanted:
            self._keyframe_wanted = False
            earlier = [k for k in self._keyframes if k <= self._position]
            self._position = earlier[-1] if earlier else 0
        packet = self._packets[self._position]
        self._position = (self._position + 1) % len(self._packets)
        out = packet.with_pts(self._index * self._step)
        self._index += 1
        self.sent += 1
        if packet.keyframe and self.kind == "video":
            self.keyframes_sent += 1
        return out


@dataclass
class ReceivedTrack:
    participant_id: str
    kind: str
    source: str
    frames: int = 0
    keyframes: int = 0
    bytes: int = 0
    first_frame_at: float | None = None
    last_frame_at: float | None = None


@dataclass
class BotStats:
    joined_at: float | None = None
    received: dict[tuple[str, str], ReceivedTrack] = field(default_factory=dict)

    def frames_from(self, participant_id: str, kind: str = "video") -> int:
        total = 0
        for (pid, k), track in self.received.items():
            if pid == participant_id and k == kind:
                total += track.frames
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "received": {
                f"{pid}/{kind}": {"frames": t.frames, "keyframes": t.keyframes, "bytes": t.bytes}
                for (pid, kind), t in self.received.items()
            },
        }


VOICE_DBOV = -20  # the audio level a speaking bot puts on its packets
SILENCE_DBOV = -127


class Bot:
    def __init__(
        self,
        url: str,
        room: str,
        token: str,
        *,
        clip: Clip | None = None,
        publish: bool = True,
        audio: bool = True,
        remb: bool = True,
        light: bool = False,
        link: LinkEmulator | None = None,
        ice_urls: Sequence[str] = (),
        speaking: bool | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.room = room
        self._token = token
        self._clip = clip
        self._publish = publish
        self._publish_audio = audio
        self._remb = remb
        self._light = light
        self.link = link  # an emulated link (both connections share it), see media_server.linkemu
        # None: no audio levels on our packets (as aiortc sends pre-encoded audio);
        # True/False: RFC 6464 levels of a voice (-20 dBov) or of silence, switchable
        self.speaking = speaking
        self._ssrc_mid: dict[int, str] = {}
        self._seq: dict[int, tuple[int, bool]] = {}  # ssrc -> (next seq, gap since last marker)
        self._config = rtc_configuration(ice_urls)
        self.stats = BotStats()
        self.participant: dict[str, Any] = {}
        self.others: dict[str, dict[str, Any]] = {}
        self.left: dict[str, str] = {}  # participant id -> reason
        self.errors: list[dict[str, Any]] = []
        self.mids: dict[str, dict[str, str]] = {}  # mid -> track info (subscribe connection)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pub: RTCPeerConnection | None = None
        self._sub: RTCPeerConnection | None = None
        self._video: ClipTrack | None = None
        self._audio: ClipTrack | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._joined = asyncio.Event()
        self._published = asyncio.Event()
        self._changed = asyncio.Event()
        self._closed = False
        hooks.prepare_process()

    @property
    def id(self) -> str:
        return str(self.participant.get("id", "?"))

    def __repr__(self) -> str:
        return f"Bot({self.room}/{self.id})"

    # -- lifecycle ----------------------------------------------------------

    async def start(self, timeout: float = 15.0) -> None:
        self._session = aiohttp.ClientSession()
        ws_url = self.url.replace("http://", "ws://").replace("https://", "wss://") + "/ws"
        self._ws = await self._session.ws_connect(ws_url, heartbeat=None)
        await self._send({"type": "join", "v": 1, "room": self.room, "token": self._token})
        self._reader = asyncio.ensure_future(self._read_loop())
        self._tasks.add(self._reader)
        joined = asyncio.ensure_future(self._joined.wait())
        try:
            await asyncio.wait_for(asyncio.shield(joined), timeout)
        except TimeoutError:
            joined.cancel()
            raise BotError("timeout", "no 'joined' from the server") from None
        if self.errors and not self._joined.is_set():
            err = self.errors[-1]
            raise BotError(str(err.get("code")), str(err.get("message")))
        self.stats.joined_at = time.monotonic()
        grants = self.participant.get("grants", [])
        if self._publish and "publish" in grants:
            await self._start_publishing()
            await asyncio.wait_for(self._published.wait(), timeout)

    async def _start_publishing(self) -> None:
        clip = self._clip
        if clip is None:
            clip = await asyncio.get_running_loop().run_in_executor(None, load_clip)
        self._video = ClipTrack("video", clip.video, 1 / clip.fps, 90000 // clip.fps)
        self._audio = ClipTrack("audio", clip.audio, 0.02, 960)
        pc = self._pub = RTCPeerConnection(self._config)
        if self.link is not None:
            attach_to_peer_connection(pc, self.link)
        tracks = []
        sources: list[tuple[ClipTrack, str]] = [(self._video, "camera")]
        if self._publish_audio:
            sources.append((self._audio, "microphone"))
        for track, source in sources:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            prefer_forwardable_codecs(transceiver)
            hooks.tap_sender(
                transceiver.sender, hooks.SenderFeedback(on_keyframe_request=track.request_keyframe)
            )
            if source == "microphone" and self.speaking is not None:
                hooks.send_audio_levels(transceiver.sender, self._voice_level)
            tracks.append((transceiver, source))
        await pc.setLocalDescription(await pc.createOffer())
        await self._send(
            {
                "type": "publish_offer",
                "sdp": pc.localDescription.sdp,
                "tracks": [{"mid": t.mid, "source": s} for t, s in tracks],
            }
        )

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self._send({"type": "leave"})
            await self._ws.close()
        await self._close_media()

    def _voice_level(self) -> int:
        return VOICE_DBOV if self.speaking else SILENCE_DBOV

    def stop_reading_signalling(self) -> None:
        """The WebSocket goes quiet without closing: nothing is read, pings go unanswered.

        Media keeps flowing: a satellite link whose TCP is stuck while RTP gets through.
        """
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.cancel()

    async def kill(self) -> None:
        """Vanish without saying goodbye (socket and media just stop)."""
        self._closed = True
        if self._ws is not None:
            self._ws._response.connection and self._ws._response.connection.transport.abort()  # type: ignore[union-attr]
        await self._close_media()

    async def _close_media(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for pc in (self._pub, self._sub):
            if pc is not None:
                await pc.close()
        if self._session is not None:
            await self._session.close()

    # -- signalling -----------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """Send one protocol message (e.g. ``recording_start``, ``consent``)."""
        await self._send(message)

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(message))

    async def _read_loop(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            try:
                await self._handle(json.loads(msg.data))
            except Exception:
                logger.exception("%r: failed to handle a server message", self)
            self._changed.set()
        self._joined.set()  # unblock start() if the server closed on us
        self._changed.set()

    async def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "joined":
            self.participant = msg["participant"]
            for p in msg["room"]["participants"]:
                self.others[p["id"]] = p
            self._joined.set()
        elif kind == "participant_joined":
            self.others[msg["participant"]["id"]] = msg["participant"]
            self.left.pop(msg["participant"]["id"], None)
        elif kind == "participant_updated":
            self.others[msg["participant"]["id"]] = msg["participant"]
        elif kind == "participant_left":
            self.others.pop(msg["participant_id"], None)
            self.left[msg["participant_id"]] = msg.get("reason", "")
        elif kind == "publish_answer":
            assert self._pub is not None
            await self._pub.setRemoteDescription(
                RTCSessionDescription(sdp=msg["sdp"], type="answer")
            )
            self._published.set()
        elif kind == "subscribe_offer":
            for track in msg["tracks"]:
                self.mids[track["mid"]] = track
            await self._answer_subscribe(msg["sdp"])
        elif kind == "track_published":
            self.mids[msg["track"]["mid"]] = msg["track"]
        elif kind == "track_unpublished":
            self.mids.pop(msg["track"]["mid"], None)
        elif kind == "error":
            self.errors.append(msg)
            logger.info("%r: server error %s: %s", self, msg.get("code"), msg.get("message"))

    async def _answer_subscribe(self, sdp: str) -> None:
        if self._sub is None:
            self._sub = RTCPeerConnection(self._config)
            if self.link is not None:
                attach_to_peer_connection(self._sub, self.link)
            self._sub.on("track", self._on_track)
            if self._light:
                self._sub.on("connectionstatechange", self._go_light)
        pc = self._sub
        self._ssrc_mid.update(_media_ssrcs_by_mid(sdp))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        answer = await pc.createAnswer()
        if not self._remb:
            # without abs-send-time the server sends no timing for bandwidth estimation and
            # this bot skips aiortc's per-packet estimator: a cheaper load generator
            answer = RTCSessionDescription(sdp=_without_abs_send_time(answer.sdp), type="answer")
        await pc.setLocalDescription(answer)
        await self._send({"type": "subscribe_answer", "sdp": pc.localDescription.sdp})

    # -- receiving ----------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        assert self._sub is not None
        mid = next((t.mid for t in self._sub.getTransceivers() if t.receiver.track is track), None)
        if mid is not None:
            self._spawn(self._consume(str(mid), track))

    async def _consume(self, mid: str, track: MediaStreamTrack) -> None:
        try:
            while True:
                item = await track.recv()
                size = len(bytes(item)) if isinstance(item, MediaPacket) else 0
                self._count_frame(mid, size, bool(getattr(item, "keyframe", False)))
        except MediaStreamError:
            pass

    def _count_frame(self, mid: str, size: int, keyframe: bool) -> None:
        info = self.mids.get(mid)
        if info is None:
            return
        key = (info["participant_id"], info["kind"])
        stats = self.stats.received.get(key)
        if stats is None:
            stats = ReceivedTrack(info["participant_id"], info["kind"], info["source"])
            self.stats.received[key] = stats
        now = time.monotonic()
        stats.frames += 1
        stats.bytes += size
        if keyframe:
            stats.keyframes += 1
        if stats.first_frame_at is None:
            stats.first_frame_at = now
        stats.last_frame_at = now

    async def _go_light(self) -> None:
        """Benchmark viewers: count frames from RTP headers once the connection is up."""
        pc = self._sub
        if pc is None or pc.connectionState != "connected":
            return
        transceivers = pc.getTransceivers()
        if transceivers:
            hooks.count_rtp_headers(transceivers[0].receiver.transport, self._on_rtp_header)

    def _on_rtp_header(self, data: bytes) -> None:
        """A frame is counted when its last packet (marker bit) arrives with no gap before it."""
        if len(data) < 12:
            return
        ssrc = int.from_bytes(data[8:12], "big")
        mid = self._ssrc_mid.get(ssrc)
        if mid is None:
            return  # RTX or unknown
        seq = int.from_bytes(data[2:4], "big")
        expected, gap = self._seq.get(ssrc, (seq, False))
        if seq != expected:
            gap = True
        if data[1] & 0x80:
            if not gap:
                self._count_frame(mid, 0, False)
            gap = False
        self._seq[ssrc] = ((seq + 1) & 0xFFFF, gap)

    # -- observation helpers --------------------------------------------------

    def sent(self, kind: str = "video") -> int:
        track = self._video if kind == "video" else self._audio
        return track.sent if track is not None else 0

    async def wait_until(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate()`` is true (checked on every server message and every 50 ms)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


def _media_ssrcs_by_mid(sdp: str) -> dict[int, str]:
    """The first (media, not RTX) SSRC of each m-section of the server's offer, with its mid."""
    out: dict[int, str] = {}
    for media in SessionDescription.parse(sdp).media:
        if media.ssrc and media.rtp.muxId:
            out[media.ssrc[0].ssrc] = str(media.rtp.muxId)
    return out


def _without_abs_send_time(sdp: str) -> str:
    return "".join(line for line in sdp.splitlines(keepends=True) if ABS_SEND_TIME_URI not in line)


# -- command line ------------------------------------------------------------


def add_bot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    parser.add_argument("--room", required=True)
    parser.add_argument(
        "--token",
        default=os.environ.get("KONSILIUM_TOKEN"),
        help="join token (or KONSILIUM_TOKEN)",
    )
    parser.add_argument("--duration", type=float, default=0, help="seconds to stay (0 = forever)")
    parser.add_argument("--no-publish", action="store_true", help="only receive")
    parser.add_argument("--report-every", type=float, default=5.0, help="seconds between reports")
    parser.add_argument("--ice-server", action="append", default=[], help="stun:/turn: URL")


async def _run_bot(args: argparse.Namespace) -> int:
    if not args.token:
        print("konsilium bot: a token is required (--token or KONSILIUM_TOKEN)")
        return 2
    bot = Bot(
        args.url, args.room, args.token, publish=not args.no_publish, ice_urls=args.ice_server
    )
    try:
        await bot.start()
    except BotError as exc:
        print(f"konsilium bot: refused: {exc}")
        await bot.stop()
        return 1
    print(json.dumps({"event": "joined", "id": bot.id}), flush=True)
    started = time.monotonic()
    try:
        while not args.duration or time.monotonic() - started < args.duration:
            await asyncio.sleep(
                min(
                    args.report_every,
                    max(args.duration, 0.1) if args.duration else args.report_every,
                )
            )
            report = {"video_sent": bot.sent("video"), "audio_sent": bot.sent("audio")}
            report.update(bot.stats.to_json())
            print(json.dumps({"event": "stats", **report}), flush=True)
    finally:
        await bot.stop()
    return 0


def run_bot(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_run_bot(args))
