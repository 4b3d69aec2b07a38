"""StepMemory: on a lossy long-round-trip link, a step up that overfilled it is not retried at once.

aiortc cannot probe, so the only way to learn that a link carries more is to
send more: the estimate rises (8 %/s, on such a link up to 1.5x what was
delivered, :meth:`~media_server.adaptation.SubscriberAdaptation._rise_limit`)
and the allocator spends it on the next rung.  On a satellite link (300 kbit/s,
600 ms, 2 % loss) the step above a viewer's steady 144p sent twice (~290 kbit/s
delivered) is 180p twice (~350 kbit/s): it fills the link's queue within a
second or two, the receiver's REMB collapses (to ~150 kbit/s), loss cuts for
the overflow follow, and every video may pause.  In the weak-link benchmark
the estimate peaked at 456-591 kbit/s in 11 of 13 satellite minutes, with up
to four cuts of more than 20 % a minute; twice everything paused (for 2.5 and
11.5 s).

So a cut that comes within ``blame_s`` of a step up (the allocation got dearer)
is the step's failure: for ``hold_s`` the estimate may rise no higher than
``factor`` x what was delivered just before the step (+ ``add_bps``), which
keeps the allocation that worked and rules out the one that did not.  Each
failure in a row doubles the hold, up to ``max_hold_s``: a satellite link's
capacity rarely changes, and each probe costs the viewer a stall.  A step
taken while nothing is held that survives its blame window ends the series.
A new path (the adaptation sees a shorter round trip) forgets everything.

Pure: no I/O, no clock of its own; every call says when.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepMemoryConfig:
    blame_s: float = 3.0  # a cut this soon after a step up is the step's
    hold_s: float = 40.0  # how long the first failure holds the estimate down
    max_hold_s: float = 160.0  # ... doubling with each failure in a row
    factor: float = 1.1  # x what was delivered before the failed step
    add_bps: int = 10_000

    def __post_init__(self) -> None:
        if self.blame_s <= 0 or not 0 < self.hold_s <= self.max_hold_s:
            raise ValueError("need blame_s > 0 and 0 < hold_s <= max_hold_s")
        if self.factor < 1 or self.add_bps < 0:
            raise ValueError("need factor >= 1 and add_bps >= 0")


class StepMemory:
    """What one subscriber's link carried before its last failed step up."""

    def __init__(self, config: StepMemoryConfig | None = None) -> None:
        self.config = config or StepMemoryConfig()
        self._step: tuple[float, float, bool] | None = None  # when, delivered before, held
        self._good_bps = 0.0
        self._hold_until = -math.inf
        self._failures = 0  # in a row
        self.failed_steps = 0  # all told, for the media stats

    def stepped_up(self, delivered_bps: float, now: float) -> None:
        """The allocation just got dearer; ``delivered_bps`` is what went before it."""
        self._settle(now)
        if self._step is None:
            self._step = (now, delivered_bps, now < self._hold_until)

    def cut(self, now: float) -> None:
        """The estimate was cut (a REMB fall or a loss cut)."""
        self._settle(now)
        if self._step is None:
            return
        at, before, _ = self._step
        self._step = None
        self._failures += 1
        self.failed_steps += 1
        hold = min(self.config.max_hold_s, self.config.hold_s * 2 ** (self._failures - 1))
        self._hold_until = max(self._hold_until, at + hold)
        self._good_bps = before

    def limit_bps(self, now: float) -> float | None:
        """No rise above this (None: no failed step is held)."""
        self._settle(now)
        if now >= self._hold_until:
            return None
        return self.config.factor * self._good_bps + self.config.add_bps

    def forget(self) -> None:
        """A new path: what the old one carried says nothing."""
        self._step = None
        self._hold_until = -math.inf
        self._failures = 0

    def _settle(self, now: float) -> None:
        """A step whose blame window passed without a cut succeeded; one taken
        under a hold (within the limit) proves nothing about the step that failed."""
        step = self._step
        if step is not None and now - step[0] > self.config.blame_s:
            self._step = None
            if not step[2]:
                self._failures = 0
