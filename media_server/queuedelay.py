"""QueueDelay: is a queue building on a subscriber's link, judged from round trips?

A receiver's REMB (libwebrtc's and aiortc's delay-based detector) falls when it
thinks packets queue.  On a link with jitter (satellite: +-15 ms each way) the
detector also fires when nothing queues: in the weak-link benchmark the link
emulator's queue stayed under 20 ms while aiortc's REMB fell to half of what
it received, cutting a satellite viewer's estimate to 100 kbit/s on a
300 kbit/s link.  A real queue shows in the round trip: every receiver report
block that answers one of its sender's recent SRs gives one sample
(:attr:`media_server.hooks.ReceiverReport.rtt_sample_s`), and the queue is the
newest sample above the smallest one of the last ``window_s`` (8 s).

:meth:`QueueDelay.confirms` is what :class:`~media_server.adaptation.
SubscriberAdaptation` asks before following a falling REMB: with fewer than
``min_samples`` samples it has no opinion (the REMB is followed, as without
it); otherwise the queue must be at least ``threshold_s`` or ``threshold_share``
of the base round trip, whichever is larger: RTT samples carry the jitter of
both directions.  No sample for ``stale_s`` is no opinion either: samples stop
when reports stop, or when the round trip outgrows the SRs the tap remembers
(8, ~8 s), which is what a very long queue does.

A change of link (3G's 150 ms to a satellite's 600 ms) moves the round trip up
as a queue would, and the 8 s floor still holds the old link's samples: every
REMB fall was believed and a satellite viewer's video paused for 10 s.  A
queue moves: it builds while we send above the link's rate and drains once we
cut.  So when every sample of the last ``settle_s`` (2 s, at least
``min_samples``) sits above the floor by more than the threshold and within
the threshold of each other, and none came while loss was heavy, the round
trip has a new level: the older samples are forgotten
(:attr:`QueueDelay.new_links` counts it).  A full drop-tail queue is flat
too (LAN to 3G: 550 ms for 2 s) but loses what overflows it: no new link is
taken within ``settle_s`` of :meth:`QueueDelay.heavy_loss`.  A queue that
stands still for 2 s without heavy loss is forgotten too; if it then grows,
it shows again.

One queue confirms one fall.  A receiver's REMB falls again at every report
while its detector still sees the queue it already reported (aiortc's fell
275 -> 231 -> 162 -> 134 -> 115 kbit/s within 3 s of one step in delay), so
once a fall was followed (:meth:`QueueDelay.followed`) the next needs the
queue to have grown by the threshold since; a sample without a queue ends the
episode.

A round trip cannot fall below the path's own delay, so two samples in a row
below half the floor, and ``faster_below_s`` (200 ms) below it, are a shorter
path (EDGE's 750 ms to a LAN's 2 ms; a clinic off its satellite and onto LTE):
:attr:`QueueDelay.faster_links` counts them, and what was learnt about the
old path's capacity is stale.
"""

from __future__ import annotations

import math
from collections import deque


class QueueDelay:
    """Queueing delay seen in round-trip samples (pure: every call says when)."""

    def __init__(
        self,
        window_s: float = 8.0,
        min_samples: int = 3,
        threshold_s: float = 0.08,
        threshold_share: float = 0.15,
        stale_s: float = 2.0,
        settle_s: float = 2.0,
        faster_below_s: float = 0.2,
    ) -> None:
        if window_s <= 0 or min_samples < 2 or threshold_s < 0 or threshold_share < 0:
            raise ValueError("window_s > 0, min_samples >= 2, thresholds >= 0")
        if not 0 < settle_s < window_s:
            raise ValueError("0 < settle_s < window_s")
        self.window_s = window_s
        self.settle_s = settle_s
        self.new_links = 0  # times the round trip settled at a new level
        self.faster_links = 0  # times it fell to under half the floor (a shorter path)
        self.faster_below_s = faster_below_s
        self._followed_queue: float | None = None  # the queue a followed fall answered
        self.stale_s = stale_s
        self.min_samples = min_samples
        self.threshold_s = threshold_s
        self.threshold_share = threshold_share
        self._samples: deque[tuple[float, float]] = deque()  # (when, rtt)
        self._lossy_at = -math.inf  # when loss was last heavy

    def add(self, rtt_s: float, now: float) -> None:
        """One round-trip sample."""
        if rtt_s < 0:
            return
        self._trim(now)
        self._follow_faster_link(rtt_s)
        self._samples.append((now, rtt_s))
        self._follow_new_link(now)
        base = self.base_s(now)
        if base is not None and rtt_s - base < self._threshold(base):
            self._followed_queue = None  # the queue drained: the next one is news

    def heavy_loss(self, now: float) -> None:
        """Loss is heavy now (a drop-tail queue overflowing): no new link for a while."""
        self._lossy_at = now

    def base_s(self, now: float) -> float | None:
        """The smallest round trip of the window (None: too few samples)."""
        self._trim(now)
        if len(self._samples) < self.min_samples:
            return None
        return min(rtt for _, rtt in self._samples)

    def recent_floor_s(self, now: float, span_s: float = 3.0) -> float | None:
        """The smallest round trip of the last ``span_s`` (None: no sample that recent).

        What the link's round trip is now, after a change of link, sooner than
        :meth:`base_s` (whose window still remembers the old link)."""
        self._trim(now)
        recent = [rtt for at, rtt in self._samples if now - at <= span_s]
        return min(recent) if recent else None

    def queued_s(self, now: float) -> float | None:
        """The two newest samples' smaller one above the base (None: too few samples).

        One sample alone is not a queue: a sample carries the scheduling delay
        of both ends' event loops, and one 90 ms high, with the link's queue
        empty, once confirmed a REMB fall that paused a satellite viewer's
        video for 9 s.  A queue lasts longer than one report interval."""
        base = self.base_s(now)
        return None if base is None else self._queued_above(base)

    def _queued_above(self, base_s: float) -> float:
        return min(self._samples[-1][1], self._samples[-2][1]) - base_s

    def _fresh_base_s(self, now: float) -> float | None:
        """:meth:`base_s`, or None when the newest sample is older than ``stale_s``."""
        base = self.base_s(now)
        return None if base is None or now - self._samples[-1][0] > self.stale_s else base

    def depth(self, now: float) -> float | None:
        """The queue (:meth:`queued_s`) in thresholds (None: too few or stale samples)."""
        base = self._fresh_base_s(now)
        if base is None:
            return None
        queued, threshold = self._queued_above(base), self._threshold(base)
        if threshold <= 0:
            return math.inf if queued > 0 else 0.0
        return queued / threshold

    def confirms(self, now: float) -> bool:
        """True unless enough recent samples show no queue worth the name, or
        only the queue a fall was already followed for."""
        base = self._fresh_base_s(now)
        if base is None:
            return True
        queued = self._queued_above(base)
        threshold = self._threshold(base)
        if self._followed_queue is not None:
            return queued >= self._followed_queue + threshold
        return queued >= threshold

    def followed(self, now: float) -> None:
        """A fall was followed for the queue seen now: the next needs it to grow."""
        base = self._fresh_base_s(now)
        if base is not None:
            self._followed_queue = self._queued_above(base)

    def _threshold(self, base_s: float) -> float:
        return max(self.threshold_s, self.threshold_share * base_s)

    def _follow_faster_link(self, rtt_s: float) -> None:
        """Count a shorter path: this sample and the one before far below the rest."""
        samples = self._samples
        if len(samples) < self.min_samples + 1:
            return
        previous = samples[-1][1]
        older = min(rtt for _, rtt in list(samples)[:-1])
        if all(r < older / 2 and older - r >= self.faster_below_s for r in (previous, rtt_s)):
            self.faster_links += 1  # the floor (the smallest sample) is the new path's now
            self._followed_queue = None

    def _follow_new_link(self, now: float) -> None:
        """Forget the samples before a round trip that moved up and stayed put."""
        samples = self._samples
        recent = [(at, rtt) for at, rtt in samples if now - at <= self.settle_s]
        if len(recent) < self.min_samples or len(recent) == len(samples):
            return
        if now - recent[0][0] < self.settle_s / 2:
            return  # a moment, not a level
        if now - self._lossy_at <= self.settle_s:
            return  # maybe a full queue
        low, high = min(rtt for _, rtt in recent), max(rtt for _, rtt in recent)
        base = min(rtt for _, rtt in samples)
        threshold = self._threshold(low)
        if low - base >= threshold and high - low < threshold:
            while len(samples) > len(recent):
                samples.popleft()
            self.new_links += 1
            self._followed_queue = None

    def snapshot(self, now: float) -> dict[str, float | int | None]:
        """Base, newest sample and recent floor (seconds), new links seen: for the media stats."""
        return {
            "base_s": self.base_s(now),
            "last_s": self._samples[-1][1] if self._samples else None,
            "recent_floor_s": self.recent_floor_s(now),
            "samples": len(self._samples),
            "new_links": self.new_links,
            "faster_links": self.faster_links,
        }

    def _trim(self, now: float) -> None:
        samples = self._samples
        while samples and now - samples[0][0] > self.window_s:
            samples.popleft()
