"""Named link profiles: the one place where "a satellite link" is defined.

Every test, benchmark and bot that puts a participant on a bad link names one of
these profiles, so that "satellite" means the same thing everywhere.

Numbers are for the whole round trip where it says RTT; the emulator applies
half of it (the one-way delay) in each direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PROFILES", "LinkProfile", "get_profile"]


@dataclass(frozen=True)
class LinkProfile:
    """One link quality, applied in each direction independently.

    Attributes:
        name: short identifier (``"satellite"``).
        rate_bps: bottleneck rate in bits per second, or ``None`` for no limit.
        rtt_ms: round-trip propagation delay; each direction adds ``rtt_ms / 2``.
        jitter_ms: maximum deviation of the one-way delay (uniform in
            ``[-jitter, +jitter]`` around ``rtt_ms / 2``, never below zero).
        loss: probability (0..1) that a packet is lost after leaving the queue.
        queue_ms: drop-tail queue bound, as time worth of bytes at ``rate_bps``;
            ignored when ``rate_bps`` is ``None``.
    """

    name: str
    rate_bps: int | None
    rtt_ms: float
    jitter_ms: float
    loss: float
    queue_ms: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("LinkProfile needs a name")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"{self.name}: rate_bps must be positive or None")
        for field in ("rtt_ms", "jitter_ms", "queue_ms"):
            value = getattr(self, field)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.name}: {field} must be a finite value >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"{self.name}: loss must be in [0, 1)")

    @property
    def one_way_ms(self) -> float:
        """Propagation delay applied in each direction."""
        return self.rtt_ms / 2.0

    @property
    def queue_bytes(self) -> int | None:
        """Drop-tail queue capacity in bytes, or ``None`` for an unlimited link."""
        if self.rate_bps is None:
            return None
        return int(self.rate_bps * self.queue_ms / 1000.0 / 8.0)


PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile("lan", rate_bps=None, rtt_ms=1.0, jitter_ms=0.0, loss=0.0, queue_ms=0.0),
        LinkProfile(
            "lte", rate_bps=10_000_000, rtt_ms=50.0, jitter_ms=5.0, loss=0.005, queue_ms=300.0
        ),
        LinkProfile(
            "3g", rate_bps=450_000, rtt_ms=150.0, jitter_ms=10.0, loss=0.01, queue_ms=400.0
        ),
        LinkProfile(
            "satellite", rate_bps=300_000, rtt_ms=600.0, jitter_ms=15.0, loss=0.02, queue_ms=500.0
        ),
        LinkProfile(
            "edge", rate_bps=64_000, rtt_ms=750.0, jitter_ms=20.0, loss=0.03, queue_ms=500.0
        ),
    )
}


def get_profile(name: str) -> LinkProfile:
    """Return the named profile; ``KeyError`` lists the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        valid = ", ".join(PROFILES)
        raise KeyError(f"unknown link profile {name!r}; valid profiles: {valid}") from None
