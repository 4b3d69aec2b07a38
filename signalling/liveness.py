"""Liveness: when is a participant's link dead?

aiohttp's own WebSocket heartbeat closes a socket whose pong is late by half its
interval (1.5 s for a 3 s heartbeat).  On a satellite link — 600 ms round trip,
a queue of half a second in front of it, 2 % loss — one lost TCP segment holds a
pong back for a retransmission timeout of a second or more, and the clinic would
be thrown out (and back in) every minute or two.

Liveness therefore comes from the WebSocket *and* the media:

* anything received on the WebSocket (a message, a ping, a pong) is a sign of
  life; after :data:`PING_AFTER_S` of silence the server sends a ping;
* the link is dead after :data:`SILENT_S` without a sign of life on the
  WebSocket — unless packets are still arriving on the participant's peer
  connections (its RTP, or the RTCP reports every receiver sends), in which
  case the WebSocket may stay silent up to :data:`SILENT_WITH_MEDIA_S`.

A participant that really vanished is therefore seen gone within ~5 s (its
tracks go at once, and it is shown "reconnecting" for the grace period), while
a slow link whose media still flows survives a late pong.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

PING_AFTER_S = 2.0
SILENT_S = 5.0
SILENT_WITH_MEDIA_S = 20.0
MEDIA_RECENT_S = 2.0  # media counts as flowing if a packet arrived within this long
CHECK_EVERY_S = 0.5


class Verdict(StrEnum):
    ALIVE = "alive"
    PING = "ping"  # silent for a while: ask
    DEAD = "dead"


class Liveness:
    """Signs of life of one connection; pure, the caller gives the time."""

    def __init__(self, now: float, media_packets: Callable[[], int] | None = None) -> None:
        self._heard_at = now
        self._pinged_at: float | None = None
        self._media_packets = media_packets
        self._media_count: int | None = None
        self._media_at: float | None = None

    def heard(self, now: float) -> None:
        """Something arrived on the WebSocket."""
        self._heard_at = now
        self._pinged_at = None

    def silence(self, now: float) -> float:
        return now - self._heard_at

    def check(self, now: float) -> Verdict:
        """What to do now; call it every :data:`CHECK_EVERY_S`."""
        self._sample_media(now)
        silent = now - self._heard_at
        if silent >= SILENT_S:
            media_flowing = self._media_at is not None and now - self._media_at < MEDIA_RECENT_S
            if not media_flowing or silent >= SILENT_WITH_MEDIA_S:
                return Verdict.DEAD
        if silent >= PING_AFTER_S and (
            self._pinged_at is None or now - self._pinged_at >= PING_AFTER_S
        ):
            self._pinged_at = now
            return Verdict.PING
        return Verdict.ALIVE

    def _sample_media(self, now: float) -> None:
        if self._media_packets is None:
            return
        try:
            count = self._media_packets()
        except Exception:  # the media is being torn down: no evidence either way
            return
        if self._media_count is not None and count > self._media_count:
            self._media_at = now
        self._media_count = count
