"""DownTrack: what one subscriber receives on one transceiver.

A DownTrack is the track of one of the subscriber connection's senders for the
whole life of that connection.  It is *bound* to a source — a Forwarder (a
published track as received) or a ladder rung — and can be rebound to another
one later: aiortc has no removeTrack, and
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
from typing import Any, Protocol

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .packet import MediaPacket, wire_bytes


class Source(Protocol):
    """Where a DownTrack's packets come from: a Forwarder (original) or a ladder rung."""

    def attach(self, sink: Any) -> None: ...

    def detach(self, sink: Any) -> None: ...

    def request_keyframe(self) -> None: ...


class _PendingFeed:
    """Receives a source a DownTrack is switching to, until that source sends a keyframe."""

    def __init__(self, downtrack: DownTrack, source: Source, same_timeline: bool) -> None:
        self.downtrack = downtrack
        self.source = source
        self.same_timeline = same_timeline

    def push(self, item: Any) -> None:
        if getattr(item, "keyframe", True):
            self.downtrack._promote(self, item)


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
        self.source: Source | None = None
        self._pending: _PendingFeed | None = None
        self._need_keyframe = kind == "video"
        # timestamp rebasing
        self._rebase = True
        self._offset = 0
        self._last_out_pts: int | None = None
        self._last_out_wall = 0.0
        # counters
        self.frames_forwarded = 0
        self.bytes_forwarded = 0
        self.wire_bytes_forwarded = 0  # with RTP/SRTP/UDP/IP headers, and repeated copies
        self.wire_bytes_repeated = 0  # the repeated copies alone (see hooks.repeat_packets)
        self.frames_dropped = 0
        self.overflows = 0
        self.switches = 0
        self.first_frame_at: float | None = None

    # -- binding ---------------------------------------------------------

    def bind(self, source: Source) -> None:
        """Carry ``source`` from its next keyframe on (a new track: nothing to keep)."""
        if self.source is source and self._pending is None:
            return
        self.unbind()
        self.source = source
        self._need_keyframe = self.kind == "video"
        self._rebase = True
        source.attach(self)
        if self._need_keyframe:
            source.request_keyframe()

    def switch(self, source: Source, *, same_timeline: bool = True) -> None:
        """Move to another version of the same picture without a gap.

        The current source keeps flowing until ``source`` delivers a keyframe;
        then the DownTrack moves over on that keyframe (make before break).
        ``same_timeline``: the new source's timestamps continue the current
        ones (a ladder rung of the same track), so no rebase is needed.
        """
        if self.source is None or self.kind != "video":
            self.bind(source)
            return
        if self.source is source:
            self._cancel_pending()
            return
        if self._pending is not None and self._pending.source is source:
            return
        self._cancel_pending()
        self._pending = _PendingFeed(self, source, same_timeline)
        source.attach(self._pending)
        source.request_keyframe()

    def _promote(self, pending: _PendingFeed, keyframe: Any) -> None:
        if pending is not self._pending or self._closed:
            return
        self._pending = None
        pending.source.detach(pending)
        old, self.source = self.source, pending.source
        if old is not None:
            old.detach(self)
        pending.source.attach(self)
        self.switches += 1
        if not pending.same_timeline:
            self._rebase = True
        self._need_keyframe = False
        self.push(keyframe)

    def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.source.detach(pending)

    def unbind(self) -> None:
        self._cancel_pending()
        source, self.source = self.source, None
        if source is not None:
            source.detach(self)
        self._queue.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def bound(self) -> bool:
        return self.source is not None

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
                if self.source is not None:
                    self.source.request_keyframe()
                logger.info("%s: queue overflow, waiting for keyframe", self.label)
                return
        self._queue.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def request_keyframe(self) -> None:
        """The subscriber lost a picture (PLI/FIR): ask the publisher."""
        if self.source is not None:
            self.source.request_keyframe()

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
            self.bytes_forwarded += len(item.data)
            self.wire_bytes_forwarded += wire_bytes(len(item.data))
            return self._rebased(item)
        return item

    def count_repeat(self, nbytes: int) -> None:
        """The sender sent a copy of one of this track's packets again (``nbytes`` on the wire)."""
        self.wire_bytes_forwarded += nbytes
        self.wire_bytes_repeated += nbytes

    def _rebased(self, packet: MediaPacket) -> MediaPacket:
        now = time.monotonic()
        if self._rebase:
            self._rebase = False
            if self._last_out_pts is None:
                # the sender adds its own random origin: the first source needs no rebase
                self._offset = 0
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
