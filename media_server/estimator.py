"""BandwidthEstimator: how many bits per second one subscriber can take.

One estimator per subscriber connection.  It is pure: no I/O, no asyncio, no
clock of its own; every input carries the time it was observed (``now``, in
seconds on any monotonic clock) and the output is asked for at a given time.

Inputs
------
* ``on_remb(bps, now)`` — the REMB the subscriber sends about our senders (its
  receive-side, delay-based estimate).  aiortc receivers send none for the
  first ~3 s and then raise it by at most 8 %/s, never above 1.5x what they
  receive + 10 kbit/s; browsers behave alike (libwebrtc ``AimdRateControl``).
* ``on_receiver_report(fraction_lost, rtt_s, now, expected)`` — one RTCP
  receiver report block (per sender, so several arrive per report interval),
  with the number of packets it covers when known.
* ``on_delivered(nbytes, now)`` — bytes we handed to the subscriber's transport;
  gives the *delivered rate* over the last second.

Rule (Google congestion control's loss-based controller, with REMB as the
delay-based one)
---------------------------------------------------------------------------
The estimate is ``min(REMB, loss-based rate)``, clamped to ``[floor, ceiling]``
and held with hysteresis, down fast and up slowly:

* **REMB drop** — followed at once: the estimate never exceeds the last REMB.
  (The adaptation first asks :mod:`queuedelay` whether round trips show a
  queue; a fall they do not confirm is not passed on.)
* **loss is judged over at least 20 packets** (libwebrtc's
  ``kLimitNumPackets``): report blocks that say how many packets they cover are
  pooled, across all the subscriber's streams, until 20 are covered; one lost
  packet of a 10 packet/s low rung is 2 % random loss on a satellite link, not
  a 20 % loss event.  Unless the pooled loss is heavy, pooling goes on to
  ``judge_loss_packets`` or ``judge_after_s``, whichever comes first: at 2 %
  random loss a third of all 20-packet pools lose one packet (5 %), which
  would hold the estimate most of the time.
* **loss > 10 %** — congestion: the estimate is cut to
  ``min(estimate, delivered rate) x (1 - 0.5 x loss)``.  The delivered rate is
  used because the allocator may be sending far less than the estimate (rungs
  are coarse): the link is known to be smaller than what we actually sent.
  Cuts are spaced by at least ``300 ms + RTT`` (libwebrtc's
  ``kBweDecreaseInterval``) so the several report blocks of one RTCP compound,
  or two reports about the same burst, do not compound into a collapse.  The
  first report with heavy loss acts immediately.
* **2 % <= loss <= 10 %** — hold: nothing changes, and the "good" clock restarts.
* **loss < 2 %** — once every report for the last ``increase_after_s`` (2 s)
  has been below 2 %, the estimate is at least ``delivered_floor_share`` of
  the delivered rate (what the link just carried cleanly; off by default),
  and it may rise, by at most 8 % per second
  (compounded over the elapsed time), and never above the last REMB.  A REMB
  older than ``remb_max_age_s`` (5 s) no longer caps the rise: aiortc
  receivers send REMB per video stream, so a paused video's REMB stops, and
  its last (low) value must not keep the video paused forever.
* **quick recovery** (``remb_recovery_fraction``, off by default) — after a
  cut, a clean link climbs at ``remb_recovery_per_s`` to that share of a REMB
  no older than ``remb_max_age_s``.

Why: aiortc cannot probe (no padding, no pacing, no transport-cc), so the only
way to learn that a link got better is to send more; a slow, multiplicative
rise, combined with ladder rungs about 1.45x apart and the allocator's streak
of calls before an upgrade, makes each step up a small, bounded probe.  A decrease, on
the other hand, must be fast: on a satellite link a few seconds of overshoot
means queued audio.  The hold band (2-10 %) absorbs random, non-congestion
loss on satellite/3G links without flapping.

The estimate starts at ``initial_bps``.  Without receiver reports it never
rises (no evidence that the link is clean); before the first REMB only the
loss rule and the ceiling bound it.  Receiver reports of every sender of the
subscriber go into the same estimator: heavy loss on any stream cuts, loss in
the hold band on any stream stops the rise.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

LOSS_INCREASE_BELOW = 0.02
LOSS_DECREASE_ABOVE = 0.10


@dataclass(frozen=True, slots=True)
class EstimatorConfig:
    """Tunables; defaults follow the rule in the module docstring."""

    initial_bps: int = 1_000_000
    floor_bps: int = 40_000
    ceiling_bps: int = 20_000_000
    increase_per_s: float = 0.08  # multiplicative, compounded
    increase_after_s: float = 2.0  # of loss < LOSS_INCREASE_BELOW before any rise
    loss_increase_below: float = LOSS_INCREASE_BELOW
    loss_decrease_above: float = LOSS_DECREASE_ABOVE
    decrease_interval_s: float = 0.3  # + RTT between two loss cuts
    delivered_window_s: float = 1.0
    # After a loss cut on a link that is clean again, climb quickly back to this share
    # of the REMB (the receiver's delay-based estimate, capped by what it receives).
    remb_recovery_fraction: float = 0.0  # 0 = off: only the slow rise
    remb_recovery_per_s: float = 0.5
    remb_max_age_s: float = 5.0  # an older REMB no longer caps the rise
    min_loss_packets: int = 20  # pool report blocks until they cover this many packets
    # ... and, unless the loss is heavy (> loss_decrease_above), this many or for this long
    judge_loss_packets: int = 20
    judge_after_s: float = 1.0
    # a clean report raises the estimate to this share of the delivered rate (0 = off)
    delivered_floor_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.floor_bps <= self.initial_bps <= self.ceiling_bps:
            raise ValueError("need 0 < floor_bps <= initial_bps <= ceiling_bps")
        if self.increase_per_s < 0 or self.increase_after_s < 0:
            raise ValueError("increase_per_s and increase_after_s must be >= 0")
        if not 0 <= self.loss_increase_below <= self.loss_decrease_above <= 1:
            raise ValueError("need 0 <= loss_increase_below <= loss_decrease_above <= 1")
        if self.delivered_window_s <= 0 or self.decrease_interval_s < 0:
            raise ValueError("delivered_window_s must be > 0 and decrease_interval_s >= 0")
        if self.remb_max_age_s <= 0:
            raise ValueError("remb_max_age_s must be > 0")
        if not 1 <= self.min_loss_packets <= self.judge_loss_packets:
            raise ValueError("need 1 <= min_loss_packets <= judge_loss_packets")


@dataclass(frozen=True, slots=True)
class EstimateSnapshot:
    """What the estimator knows at one moment (for stats, logs and the client's indicator)."""

    estimate_bps: int
    remb_bps: int | None
    fraction_lost: float | None  # last report
    rtt_s: float | None
    delivered_bps: int | None
    state: str  # direction of the last change: "increase" | "hold" | "decrease"
    last_cut: str | None = None  # what made the last decrease: "remb" | "loss 0.23"


class BandwidthEstimator:
    """Per-subscriber estimate = min(REMB, loss rule), down fast and up slowly."""

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        self.config = config or EstimatorConfig()
        self._estimate = float(self.config.initial_bps)
        self._remb: int | None = None
        self._remb_at = 0.0
        self._loss: float | None = None
        self._rtt: float | None = None
        self._good_since: float | None = None  # first of an unbroken run of reports < 2 %
        self._last_time: float | None = None  # last time the estimate was advanced
        self._last_cut: float | None = None
        self._last_change = "hold"
        self._delivered: deque[tuple[float, int]] = deque()
        self._delivered_bytes = 0
        self._first_delivery: float | None = None
        self._pooled_lost = 0.0  # report blocks not yet judged (see min_loss_packets)
        self._pooled_expected = 0
        self._pool_started = 0.0
        # set by the caller: no rise past this (None: no such limit); see adaptation.py
        self.rise_limit_bps: float | None = None
        self._last_cut_by: str | None = None
        self.decreases = 0  # counters, for stats
        self.increases = 0

    # -- inputs -------------------------------------------------------------

    def on_remb(self, bps: int, now: float) -> None:
        """The subscriber's REMB; a drop is followed immediately."""
        self._advance(now)
        self._remb = max(0, int(bps))
        self._remb_at = now
        if self._remb < self._estimate:
            self._set(max(float(self.config.floor_bps), float(self._remb)), "decrease")
            self._last_cut_by = "remb"

    def on_receiver_report(
        self, fraction_lost: float, rtt_s: float | None, now: float, expected: int | None = None
    ) -> None:
        """One report block: ``fraction_lost`` in 0..1 since the previous report.

        ``expected``: how many packets the block covers.  Blocks that say are
        pooled until they cover ``min_loss_packets``; a block without it is
        judged on its own.
        """
        self._advance(now)
        if rtt_s is not None and rtt_s >= 0:
            self._rtt = float(rtt_s)
        loss = min(1.0, max(0.0, float(fraction_lost)))
        if expected is not None:
            if expected <= 0:
                return
            if self._pooled_expected == 0:
                self._pool_started = now
            self._pooled_lost += loss * expected
            self._pooled_expected += expected
            if self._pooled_expected < self.config.min_loss_packets:
                return
            loss = min(1.0, self._pooled_lost / self._pooled_expected)
            if (
                loss <= self.config.loss_decrease_above
                and self._pooled_expected < self.config.judge_loss_packets
                and now - self._pool_started < self.config.judge_after_s
            ):
                return  # not heavy: pool on for a steadier figure
            self._pooled_lost, self._pooled_expected = 0.0, 0
        self._loss = loss
        cfg = self.config
        if loss > cfg.loss_decrease_above:
            self._good_since = None
            interval = cfg.decrease_interval_s + (self._rtt or 0.0)
            if self._last_cut is None or now - self._last_cut >= interval:
                self._last_cut = now
                base = self._estimate
                delivered = self.delivered_bps(now)
                if delivered is not None:
                    base = min(base, float(delivered))
                target = max(float(cfg.floor_bps), base * (1.0 - 0.5 * loss))
                if target < self._estimate:
                    self._set(target, "decrease")
                    self._last_cut_by = f"loss {loss:.2f}"
        elif loss >= cfg.loss_increase_below:
            self._good_since = None
            self._last_change = "hold"
        else:
            if self._good_since is None:
                self._good_since = now
            self._raise_to_delivered(now)

    def on_new_path(self, start_bps: int, now: float) -> None:
        """The subscriber's path changed: start again from ``start_bps``, never lower.

        What was learnt (a cut to EDGE's 40 kbit/s, a REMB about the old path)
        is about a link that is gone; libwebrtc resets its estimate to its start
        value on a network route change.  From the 40 kbit/s floor the slow rise
        took 12 s to afford the lowest video rung again.  The loss and REMB
        rules correct a start value the new path cannot carry.
        """
        self._advance(now)
        if start_bps > self._estimate:
            self._set(min(float(start_bps), float(self.config.ceiling_bps)), "increase")
        self._remb = None  # about the old path: no cap on the rise
        self._pooled_lost, self._pooled_expected = 0.0, 0
        self._good_since = now

    def on_delivered(self, nbytes: int, now: float) -> None:
        """Bytes handed to the subscriber's transport at ``now``."""
        if nbytes <= 0:
            return
        if self._first_delivery is None:
            self._first_delivery = now
        self._delivered.append((now, nbytes))
        self._delivered_bytes += nbytes
        self._expire(now)

    # -- outputs ------------------------------------------------------------

    def estimate_bps(self, now: float) -> int:
        """The estimate at ``now`` (advances the slow increase, if allowed)."""
        self._advance(now)
        return int(self._estimate)

    @property
    def judged_loss(self) -> float | None:
        """The loss last judged (over pooled report blocks, see min_loss_packets)."""
        return self._loss

    def delivered_bps(self, now: float) -> int | None:
        """Delivered rate over the last window; None until half a window was observed."""
        if self._first_delivery is None:
            return None
        self._expire(now)
        window = self.config.delivered_window_s
        span = min(window, now - self._first_delivery)
        if span < window / 2:
            return None
        return int(8 * self._delivered_bytes / span)

    def snapshot(self, now: float) -> EstimateSnapshot:
        estimate = self.estimate_bps(now)
        return EstimateSnapshot(
            estimate_bps=estimate,
            remb_bps=self._remb,
            fraction_lost=self._loss,
            rtt_s=self._rtt,
            delivered_bps=self.delivered_bps(now),
            state=self._last_change,
            last_cut=self._last_cut_by,
        )

    # -- internals ------------------------------------------------------------

    def _set(self, value: float, change: str) -> None:
        if change == "decrease":
            self.decreases += 1
        elif change == "increase":
            self.increases += 1
        self._estimate = value
        self._last_change = change

    def _cap(self, now: float) -> float:
        cap = float(self.config.ceiling_bps)
        remb = self._fresh_remb(now)
        if remb is not None:
            cap = min(cap, max(float(self.config.floor_bps), float(remb)))
        if self.rise_limit_bps is not None:
            cap = min(cap, max(float(self.config.floor_bps), self.rise_limit_bps))
        return cap

    def _advance(self, now: float) -> None:
        """Apply the slow increase for the time since the last call."""
        last = self._last_time
        if last is not None and now <= last:
            return  # same instant, or a clock step back: nothing to grow
        self._last_time = now
        if last is None or self._good_since is None:
            return
        allowed_from = self._good_since + self.config.increase_after_s
        start = max(last, allowed_from)
        if now <= start:
            return
        cap = self._cap(now)
        if self._estimate >= cap:
            return
        grown = self._estimate * math.pow(1.0 + self.config.increase_per_s, now - start)
        remb_target = self._remb_recovery_target(now)
        if remb_target is not None and grown < remb_target:
            # a clean link whose delay-based REMB says more: a loss cut overshot
            fast = self._estimate * math.pow(1.0 + self.config.remb_recovery_per_s, now - start)
            grown = min(remb_target, max(grown, fast))
        new = min(cap, grown)
        if new > self._estimate:
            self._set(new, "increase")

    def _raise_to_delivered(self, now: float) -> None:
        """A link that carried what we sent, without loss, carries at least that.

        After a deep cut (a link drop, EDGE) the estimate can sit far below what
        the subscriber is receiving cleanly again (its audio, say); climbing from
        there at 8 %/s would take half a minute.  Never above the REMB's cap: a
        REMB below the delivered rate is a receiver seeing a queue.

        Only once every report for ``increase_after_s`` was clean, as for any
        rise: "delivered" is what we handed to the transport, not what got
        through.  One clean report amid lossy ones (a pool of small audio
        packets that a full queue let through, a report about the time before
        an overload) lifted a satellite viewer's estimate to 0.9x the 1.8 Mbit/s
        being pushed into its 300 kbit/s link.
        """
        share = self.config.delivered_floor_share
        delivered = self.delivered_bps(now)
        if share <= 0 or delivered is None or not self._clean_long_enough(now):
            return
        target = min(self._cap(now), share * delivered)
        if target > self._estimate:
            self._set(target, "increase")

    def _clean_long_enough(self, now: float) -> bool:
        """Every report for the last ``increase_after_s`` was below the rise threshold."""
        good = self._good_since
        return good is not None and now - good >= self.config.increase_after_s

    def _remb_recovery_target(self, now: float) -> float | None:
        """Where a clean link climbs back quickly: a share of a REMB no older than
        ``remb_max_age_s``.

        The REMB kept here is the last one passed on, not the last one sent: a
        fall the round trips did not confirm is not passed on, and a paused
        video sends none.  An old one is about another moment: LAN to 3G, the
        1.4 Mbit/s REMB of the drop's first seconds, 7.5 s old, pulled the
        estimate from 454 kbit/s to 1.09 Mbit/s in 3 s on the 450 kbit/s
        link; on EDGE, a 113 kbit/s one 6 s old resumed a video that filled
        the 64 kbit/s link's queue for 6 s.
        """
        fraction = self.config.remb_recovery_fraction
        remb = self._fresh_remb(now)
        if fraction <= 0 or remb is None:
            return None
        return fraction * remb

    def _fresh_remb(self, now: float) -> int | None:
        """The last REMB passed on, if at most ``remb_max_age_s`` old."""
        if self._remb is None or now - self._remb_at > self.config.remb_max_age_s:
            return None
        return self._remb

    def _expire(self, now: float) -> None:
        horizon = now - self.config.delivered_window_s
        while self._delivered and self._delivered[0][0] <= horizon:
            self._delivered_bytes -= self._delivered.popleft()[1]
