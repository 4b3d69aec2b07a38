"""VideoRepeat: whether a subscriber's link needs its video rungs sent twice.

A lost video packet is repaired by NACK one round trip later (plus the time
the receiver takes to see the gap), and every frame behind the hole waits for
it.  On a satellite link (600 ms round trip, 2 % random loss) a low rung of
~10 packets/s loses a packet every few seconds, and each loss holds the
picture for ~0.7 s: a freeze.  ARQ cannot be faster than the round trip, and
aiortc has no FEC.  So on such a link each packet of a rung is sent twice,
~30 ms apart (:func:`media_server.hooks.repeat_packets`, on the RTX stream):
the picture then stalls only when both copies are lost (0.04 % of packets at
2 % loss), at twice the rate, which the allocator pays for by counting every
rung twice.  Originals are never repeated: a link that carries an original
well is not one where doubling pays, and one that cannot would not carry two.

Rule (:class:`VideoRepeat`, pure, called once per adaptation tick):

* **on** once the link's loss (smoothed, from the streams that are *not*
  repeated packet for packet: audio originals, the mix's copies, videos sent
  once; a repeated stream's receiver reports hide the loss) is at least
  ``on_loss`` (1 %) and the round trip at least ``on_rtt_s`` (550 ms; the
  adaptation passes the floor of the last 3 s of round trips), and the video
  budget (the estimate after audio) covers the cheapest rung twice with
  ``on_budget_share`` (15 %) to spare.  A queue on a congested terrestrial
  link lifts the round trips' floor too: in the weak-link
  benchmark 3G's 400 ms drop-tail queue held it at 0.31-0.50 s for up to
  4.5 s after a drop or an overshoot, and with a 300 ms threshold the video
  went twice and the doubled price moved a rung once more (3G convergence
  5.2 s, twice in five runs).  Nor does the queue judge's 8 s base tell them
  apart: a queue that stands for 8 s, or one it takes for a new link, lifts
  it too (0.24-0.43 s in the run that tried it).  No 3G queue lifts the floor
  past 3G's path plus its whole queue (150 + 400 ms), while a geostationary
  hop alone is ~600 ms.  The cost: a path of 300-550 ms (a long terrestrial
  route, a bloated cellular buffer) is repaired by NACK alone, ~0.4-0.6 s a
  lost packet;
* **off** once the loss falls below ``off_loss`` (0.4 %), the round trip
  below ``off_rtt_s`` (200 ms), or the budget below the cheapest rung twice:
  a single copy of a small picture beats a paused one.  (Copies once kept
  down to 85 % of it: a video coming down from a higher rung then found no
  rung whose two copies fit and paused, with one copy of the cheapest rung
  affordable; a satellite viewer saw audio only for 5 s.)
* without a loss or a round-trip figure the state is kept.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RepeatConfig:
    on_loss: float = 0.01
    off_loss: float = 0.004
    on_rtt_s: float = 0.55
    off_rtt_s: float = 0.2
    on_budget_share: float = 1.15  # x the cheapest rung twice, to start the copies
    copies: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.off_loss <= self.on_loss:
            raise ValueError("need 0 <= off_loss <= on_loss")
        if not 0 <= self.off_rtt_s <= self.on_rtt_s:
            raise ValueError("need 0 <= off_rtt_s <= on_rtt_s")
        if self.on_budget_share < 1:
            raise ValueError("on_budget_share must be >= 1")
        if self.copies < 2:
            raise ValueError("copies must be >= 2")


class VideoRepeat:
    """One subscriber's choice: video rungs sent once, or ``config.copies`` times."""

    def __init__(self, config: RepeatConfig | None = None) -> None:
        self.config = config or RepeatConfig()
        self._link = False  # lossy, with a long round trip
        self._on = False
        self.changes = 0

    @property
    def copies(self) -> int:
        """Copies of each rung packet now (1 or ``config.copies``)."""
        return self.config.copies if self._on else 1

    @property
    def link_needs(self) -> bool:
        """The link is lossy with a long round trip: repeats pay if the budget allows."""
        return self._link

    def decide(
        self,
        loss: float | None,
        rtt_s: float | None,
        video_budget_bps: float,
        cheapest_rung_bps: int | None,
    ) -> int:
        """Copies of each rung packet from now on.

        ``loss``: the link's smoothed loss (0..1) from streams sent once;
        ``rtt_s``: the floor of the last 3 s of round trips;
        ``video_budget_bps``: the estimate less what audio takes;
        ``cheapest_rung_bps``: one copy of the lowest rung on offer (None: no rungs).
        """
        cfg = self.config
        if self._link:
            self._link = not (
                (loss is not None and loss < cfg.off_loss)
                or (rtt_s is not None and rtt_s < cfg.off_rtt_s)
            )
        else:
            self._link = (
                loss is not None
                and loss >= cfg.on_loss
                and rtt_s is not None
                and rtt_s >= cfg.on_rtt_s
            )
        on = False
        if self._link and cheapest_rung_bps is not None and cheapest_rung_bps > 0:
            doubled = cfg.copies * cheapest_rung_bps
            on = video_budget_bps >= (doubled if self._on else cfg.on_budget_share * doubled)
        if on != self._on:
            self._on = on
            self.changes += 1
        return self.copies
