"""QueueDelay: is a queue building on a subscriber's link, judged from round trips?

A receiver's REMB (libwebrtc's and aiortc's delay-based detector) falls when it
thinks packets queue.  On a link with jitter (satellite: +-15 ms each way) the
detector also fires when nothing queues: in the weak-link benchmark the link
emulator's queue stayed under 20 ms while aiortc's REMB fell to half of what
it received, cutting a satellite viewer's estimate to 100 kbit/s on a
300 kbit/s link.  A real queue shows in the round trip: every receiver report
block that answers its sender's latest SR gives one sample
(:attr:`media_server.hooks.ReceiverReport.rtt_sample_s`), and the queue is the
newest sample above the smallest one of the last ``window_s`` (8 s).

:meth:`QueueDelay.confirms` is what :class:`~media_server.adaptation.
SubscriberAdaptation` asks before following a falling REMB: with fewer than
``min_samples`` samples it has no opinion (the REMB is followed, as without
it); otherwise the queue must be at least ``threshold_s`` or ``threshold_share``
of the base round trip, whichever is larger: RTT samples carry the jitter of
both directions.  No sample for ``stale_s`` is no opinion either: aiortc
remembers only its latest SR, so once the round trip (queue included) is
longer than the SR interval (~1 s) no block answers it and samples stop,
exactly when a queue is long (EDGE with its 500 ms queue full).
"""

from __future__ import annotations

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
    ) -> None:
        if window_s <= 0 or min_samples < 1 or threshold_s < 0 or threshold_share < 0:
            raise ValueError("window_s > 0, min_samples >= 1, thresholds >= 0")
        self.window_s = window_s
        self.stale_s = stale_s
        self.min_samples = min_samples
        self.threshold_s = threshold_s
        self.threshold_share = threshold_share
        self._samples: deque[tuple[float, float]] = deque()  # (when, rtt)

    def add(self, rtt_s: float, now: float) -> None:
        if rtt_s < 0:
            return
        self._samples.append((now, rtt_s))
        self._trim(now)

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
        """The newest sample above the base (None: too few samples)."""
        base = self.base_s(now)
        if base is None:
            return None
        return self._samples[-1][1] - base

    def confirms(self, now: float) -> bool:
        """True unless enough recent samples show no queue worth the name."""
        queued = self.queued_s(now)
        if queued is None or now - self._samples[-1][0] > self.stale_s:
            return True
        base = self._samples[-1][1] - queued
        return queued >= max(self.threshold_s, self.threshold_share * base)

    def _trim(self, now: float) -> None:
        samples = self._samples
        while samples and now - samples[0][0] > self.window_s:
            samples.popleft()
