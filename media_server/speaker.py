"""Active speaker: who is talking, from the audio levels publishers send.

Browsers put an RFC 6464 audio level (``urn:ietf:params:rtp-hdrext:ssrc-audio-level``,
0 = loudest … 127 = silence, in −dBov) on every Opus packet; aiortc parses it
and :func:`media_server.hooks.install_passthrough` hands it to the track's
:class:`AudioLevel`, without decoding anything.

* :class:`AudioLevel` — one received audio stream: the share of its packets in
  the last second that carried voice (louder than :data:`VOICE_DBOV`).
* :class:`SpeakerDetector` — the room's active speaker, with hysteresis: a
  participant takes the floor after speaking for :data:`TAKE_FLOOR_S`, clearly
  more than the current speaker; a speaker who falls silent keeps the floor
  until someone else speaks (a council listens to whoever spoke last).

The allocator serves the active speaker's camera before the others'
(``PRIORITY_SPEAKER``), and clients are told who it is.  Pure: the caller
gives the time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

VOICE_DBOV = 50  # a packet louder than -50 dBov carries voice
WINDOW_S = 1.0
SPEAKING = 0.3  # share of voiced packets over the window that counts as speaking
TAKE_FLOOR_S = 1.0
MARGIN = 0.15  # a challenger must be this much more active than the current speaker


class AudioLevel:
    """Voice activity of one audio stream over the last :data:`WINDOW_S`."""

    def __init__(self) -> None:
        self._packets: deque[tuple[float, bool]] = deque()
        self._voiced = 0

    def add(self, level: int, now: float) -> None:
        """One packet's RFC 6464 level (0 loudest … 127 silent)."""
        voiced = level <= VOICE_DBOV
        self._packets.append((now, voiced))
        self._voiced += voiced
        self._expire(now)

    def activity(self, now: float) -> float:
        """Share of the window's packets that carried voice (0 when nothing arrived)."""
        self._expire(now)
        if not self._packets:
            return 0.0
        return self._voiced / len(self._packets)

    def _expire(self, now: float) -> None:
        horizon = now - WINDOW_S
        packets = self._packets
        while packets and packets[0][0] <= horizon:
            self._voiced -= packets.popleft()[1]


class SpeakerDetector:
    """The room's active speaker (a participant id, or None before anyone spoke)."""

    def __init__(self) -> None:
        self.speaker: str | None = None
        self._challenger: str | None = None
        self._challenger_since = 0.0

    def update(self, activity: Mapping[str, float], now: float) -> bool:
        """Feed each participant's :meth:`AudioLevel.activity`; True if the speaker changed."""
        if self.speaker is not None and self.speaker not in activity:
            self.speaker = None  # left the room
        current = activity.get(self.speaker, 0.0) if self.speaker is not None else 0.0
        loudest = max(
            (p for p in activity if p != self.speaker),
            key=lambda p: activity[p],
            default=None,
        )
        if loudest is None or activity[loudest] < SPEAKING or activity[loudest] < current + MARGIN:
            self._challenger = None
            return False
        if loudest != self._challenger:
            self._challenger, self._challenger_since = loudest, now
        if self.speaker is not None and now - self._challenger_since < TAKE_FLOOR_S:
            return False
        self.speaker, self._challenger = loudest, None
        return True
