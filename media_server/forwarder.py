"""Forwarder: one per published track, fans its packets out to DownTracks and sinks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiortc import MediaStreamTrack, RTCRtpReceiver
from aiortc.mediastreams import MediaStreamError

from . import hooks
from .packet import MediaPacket, vp8_keyframe_size, wire_bytes

logger = logging.getLogger(__name__)

KEYFRAME_REQUEST_INTERVAL_S = 0.5


class PacketSink(Protocol):
    """Anything that takes the track's packets without blocking (a DownTrack, a recorder)."""

    def push(self, item: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class TrackInfo:
    id: str
    participant_id: str
    kind: str  # "audio" | "video"
    source: str  # "camera" | "microphone" | "screen"

    def to_json(self, mid: str | None = None) -> dict[str, str]:
        out = {
            "id": self.id,
            "participant_id": self.participant_id,
            "kind": self.kind,
            "source": self.source,
        }
        if mid is not None:
            out["mid"] = mid
        return out


class Forwarder:
    """Reads the publisher's track once and hands every packet to each attached sink."""

    def __init__(
        self,
        info: TrackInfo,
        track: MediaStreamTrack,
        receiver: RTCRtpReceiver | None,
        on_ended: Callable[[Forwarder], None] | None = None,
    ) -> None:
        self.info = info
        self._track = track
        self._receiver = receiver
        self._on_ended = on_ended
        self._sinks: list[PacketSink] = []
        self._task: asyncio.Task[None] | None = None
        self._last_pli = 0.0
        self._pli_pending: asyncio.TimerHandle | None = None
        self.packets = 0
        self.bytes = 0
        self.wire_bytes = 0  # with RTP/SRTP/UDP/IP headers (see packet.wire_bytes)
        self.keyframes = 0
        self.frame_size: tuple[int, int] | None = None  # from the last VP8 keyframe
        self.last_packet_at: float | None = None
        self.keyframe_requests_sent = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"Forwarder({self.info.id})"

    def voice_activity(self, now: float) -> float:
        """Share of the last second's audio packets that carried voice (0 for video)."""
        meter = hooks.audio_level_of(self._track)
        return 0.0 if meter is None else meter.activity(now)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def attach(self, sink: PacketSink) -> None:
        if sink not in self._sinks:
            self._sinks.append(sink)

    def detach(self, sink: PacketSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    @property
    def sink_count(self) -> int:
        return len(self._sinks)

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe, at most once per interval (trailing request kept)."""
        if self.info.kind != "video" or self._receiver is None or self.closed:
            return
        now = time.monotonic()
        wait = self._last_pli + KEYFRAME_REQUEST_INTERVAL_S - now
        if wait <= 0:
            self._send_pli()
        elif self._pli_pending is None:
            self._pli_pending = asyncio.get_running_loop().call_later(wait, self._send_pli)

    def _send_pli(self) -> None:
        self._pli_pending = None
        if self.closed or self._receiver is None:
            return
        if hooks.send_pli(self._receiver):
            self._last_pli = time.monotonic()
            self.keyframe_requests_sent += 1
        else:
            # no media seen yet: try again shortly
            self._pli_pending = asyncio.get_running_loop().call_later(
                KEYFRAME_REQUEST_INTERVAL_S / 2, self._send_pli
            )

    async def _run(self) -> None:
        try:
            while True:
                item = await self._track.recv()
                self.packets += 1
                self.last_packet_at = time.monotonic()
                if isinstance(item, MediaPacket):
                    self.bytes += len(item.data)
                    self.wire_bytes += wire_bytes(len(item.data))
                    if item.keyframe and item.kind == "video":
                        self.keyframes += 1
                        self.frame_size = vp8_keyframe_size(item.data) or self.frame_size
                for sink in tuple(self._sinks):
                    sink.push(item)
        except MediaStreamError:
            logger.debug("%r: source ended", self)
        except asyncio.CancelledError:
            pass
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._pli_pending is not None:
            self._pli_pending.cancel()
            self._pli_pending = None
        if self._on_ended is not None:
            self._on_ended(self)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._finish()
