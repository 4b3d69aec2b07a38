"""DownTrack: what one subscriber receives on one transceiver.

A DownTrack is the track of one of the subscriber connection's senders for the
whole life of that connection.  It is *bound* to a Forwarder (a published
track) and can be rebound to another one later: aiortc has no removeTrack, and
a sender whose track ends stops for good, so a transceiver freed by a
departed participant is reused by re-binding its DownTrack.

Each DownTrack has its own bounded queue.  When the queue overflows (the
event loop fell behind) it is flushed and video resumes on the next keyframe,
which is requested from the publisher.  Timestamps are rebased on every bind
so the subscriber sees one continuous RTP timeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .packet import MediaPacket

if TYPE_CHECKING:
    from .forwarder import Forwarder

logger = logging.getLogger(__name__)

VIDEO_QUEUE_FRAMES = 45
AUDIO_QUEUE_FRAMES = 50


class DownTrack(MediaStreamTrack):
    """A subscriber's view of one published track (rebindable)."""

    def __init__(self, kind: str, label: str, capacity: int | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.label = label
        self._capacity = capacity or (VIDEO_QUEUE_FRAMES if kind == "video" else AUDIO_QUEUE_FRAMES)
        self._queue: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.forwarder: Forwarder | None = None
        self._need_keyframe = kind == "video"
        # timestamp rebasing
        self._rebase = True
        self._offset = 0
        self._last_out_pts: int | None = None
        self._last_out_wall = 0.0
        # counters
        self.frames_forwarded = 0
        self.frames_dropped = 0
        self.overflows = 0
        self.first_frame_at: float | None = None

    # -- binding ---------------------------------------------------------

    def bind(self, forwarder: Forwarder) -> None:
        if self.forwarder is forwarder:
            return
        self.unbind()
        self.forwarder = forwarder
        self._need_keyframe = self.kind == "video"
        self._rebase = True
        forwarder.attach(self)
        if self._need_keyframe:
            forwarder.request_keyframe()

    def unbind(self) -> None:
        forwarder, self.forwarder = self.forwarder, None
        if forwarder is not None:
            forwarder.detach(self)
        self._queue.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def bound(self) -> bool:
        return self.forwarder is not None

    # -- producer side (Forwarder) ----------------------------------------

    def push(self, item: Any) -> None:
        """Offer one packet (or decoded frame in re-encode mode). Never blocks."""
        if self._closed:
            return
        if self._need_keyframe:
            if not getattr(item, "keyframe", True):
                self.frames_dropped += 1
                return
            self._need_keyframe = False
        if len(self._queue) >= self._capacity:
            self.overflows += 1
            self.frames_dropped += len(self._queue)
            self._queue.clear()
            if self.kind == "video" and not getattr(item, "keyframe", True):
                self._need_keyframe = True
                self.frames_dropped += 1
                if self.forwarder is not None:
                    self.forwarder.request_keyframe()
                logger.info("%s: queue overflow, waiting for keyframe", self.label)
                return
        self._queue.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def request_keyframe(self) -> None:
        """The subscriber lost a picture (PLI/FIR): ask the publisher."""
        if self.forwarder is not None:
            self.forwarder.request_keyframe()

    # -- consumer side (RTCRtpSender) --------------------------------------

    async def recv(self) -> Any:
        while not self._queue:
            if self._closed:
                raise MediaStreamError
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._queue.popleft()
        if item is None:
            raise MediaStreamError
        self.frames_forwarded += 1
        if self.first_frame_at is None:
            self.first_frame_at = time.monotonic()
        if isinstance(item, MediaPacket):
            return self._rebased(item)
        return item

    def _rebased(self, packet: MediaPacket) -> MediaPacket:
        now = time.monotonic()
        if self._rebase:
            self._rebase = False
            if self._last_out_pts is None:
                self._offset = -packet.pts
            else:
                # continue the previous timeline as if real time had passed
                clock = packet.time_base.denominator // max(packet.time_base.numerator, 1)
                elapsed = max(int((now - self._last_out_wall) * clock), 1)
                self._offset = self._last_out_pts + elapsed - packet.pts
        pts = packet.pts + self._offset
        self._last_out_pts = pts
        self._last_out_wall = now
        return packet if pts == packet.pts else packet.with_pts(pts)

    def stop(self) -> None:
        if not self._closed:
            self._closed = True
            self.unbind()
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        super().stop()
