"""Userspace link emulator: rate, drop-tail queue, delay, jitter and loss.

The kernel on our test machines has ``tbf``/``htb`` but no ``netem``, so delay,
jitter and loss are applied here, on the UDP path of a test client.

Model of one direction (:class:`LinkModel`, pure and clock-free):

1. *Serialisation*: a packet waits behind the backlog and is clocked out at
   ``rate_bps``. The queue is drop-tail and bounded in time: a packet that would
   leave more than ``queue_ms`` after it arrived is dropped (``dropped_queue``).
   This is ``queue_ms`` worth of bytes at the current rate. An idle link always
   accepts a packet, however large.
2. *Propagation*: the one-way delay ``rtt_ms / 2`` plus uniform jitter in
   ``[-jitter_ms, +jitter_ms]`` (never below zero). Delivery times are clamped
   to be non-decreasing, so the link never reorders packets. The clamp only
   bites when packets are closer together than twice the jitter; then it pulls
   their delays towards ``one_way + jitter`` (never past it), as a real
   jittery hop that keeps order would.
3. *Loss*: after serialisation, a packet is lost with probability ``loss``
   (Bernoulli, ``dropped_loss``). Lost packets still used the link.

Each offered packet draws exactly two numbers from a seeded ``random.Random``,
so the outcome is deterministic for a given seed and input timing, and the
loss pattern does not depend on queue drops.

A profile change applies to packets offered after it; packets already accepted
keep their schedule (the backlog built at the old rate drains at the old rate).

:class:`LinkDirection` drives a model with the running asyncio loop and hands
each surviving packet to a ``deliver(data, addr)`` callback, in order, at its
delivery time (``loop.call_at``). :class:`LinkEmulator` is a pair of
directions (``up``, ``down``) sharing one profile, and :class:`LinkSchedule`
plays a list of ``(profile, seconds)`` phases on an emulator.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeAlias

from .profiles import LinkProfile, get_profile

__all__ = [
    "Address",
    "Deliver",
    "DirectionStats",
    "EmulatorStats",
    "Fate",
    "LinkDirection",
    "LinkEmulator",
    "LinkModel",
    "LinkSchedule",
    "Verdict",
    "resolve_profile",
]

logger = logging.getLogger(__name__)

Address: TypeAlias = tuple[Any, ...] | None
Deliver: TypeAlias = Callable[[bytes, Address], None]
OnPhase: TypeAlias = Callable[[int, LinkProfile], None]

# asyncio may run a timer up to one clock resolution early.
_CLOCK_SLACK = time.get_clock_info("monotonic").resolution + 1e-9


def resolve_profile(profile: LinkProfile | str) -> LinkProfile:
    """Accept a profile or the name of one of :data:`PROFILES`."""
    if isinstance(profile, LinkProfile):
        return profile
    return get_profile(profile)


class Fate(enum.Enum):
    """What the link did with an offered packet."""

    DELIVER = "deliver"
    QUEUE_DROP = "queue_drop"
    LOSS = "loss"
    CLOSED = "closed"


@dataclass(frozen=True)
class Verdict:
    """Outcome of :meth:`LinkModel.offer`; ``at`` is the delivery time for DELIVER."""

    fate: Fate
    at: float


class LinkModel:
    """Pure model of one link direction: no clock, no I/O.

    Call :meth:`offer` with the arrival time of each packet (non-decreasing,
    seconds on any clock) and its size; it returns the packet's fate and, if it
    survives, its delivery time on the same clock.
    """

    def __init__(self, profile: LinkProfile, seed: int | str = 0) -> None:
        self._profile = profile
        self._rng = random.Random(seed)
        self._busy_until = float("-inf")
        self._last_delivery = float("-inf")

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    def set_profile(self, profile: LinkProfile) -> None:
        self._profile = profile

    def backlog(self, now: float) -> float:
        """Seconds until the queue (including the packet on the wire) is empty."""
        return max(0.0, self._busy_until - now)

    def offer(self, now: float, size: int) -> Verdict:
        p = self._profile
        loss_draw = self._rng.random()
        jitter_draw = self._rng.random()

        if p.rate_bps is None:
            sent_at = now
        else:
            backlog = self.backlog(now)
            tx = size * 8.0 / p.rate_bps
            if backlog > 0.0 and backlog + tx > p.queue_ms / 1000.0:
                return Verdict(Fate.QUEUE_DROP, now)
            sent_at = now + backlog + tx
            self._busy_until = sent_at

        if loss_draw < p.loss:
            return Verdict(Fate.LOSS, sent_at)

        delay_ms = max(0.0, p.one_way_ms + (2.0 * jitter_draw - 1.0) * p.jitter_ms)
        at = max(sent_at + delay_ms / 1000.0, self._last_delivery)
        self._last_delivery = at
        return Verdict(Fate.DELIVER, at)


@dataclass
class DirectionStats:
    """Counters of one direction. ``bytes`` counts delivered bytes."""

    sent: int = 0
    delivered: int = 0
    dropped_queue: int = 0
    dropped_loss: int = 0
    bytes: int = 0
    bytes_sent: int = 0

    @property
    def in_flight(self) -> int:
        return self.sent - self.delivered - self.dropped_queue - self.dropped_loss


@dataclass(frozen=True)
class EmulatorStats:
    profile: str
    up: DirectionStats
    down: DirectionStats


class LinkDirection:
    """One direction of a link, driven by the running asyncio loop.

    ``deliver`` is the default callback for surviving packets; :meth:`send` can
    pass a per-packet one (several sockets sharing one link). Packets are
    delivered in the order they were sent.
    """

    def __init__(
        self,
        profile: LinkProfile | str,
        *,
        seed: int | str = 0,
        deliver: Deliver | None = None,
        name: str = "link",
    ) -> None:
        self.name = name
        self._model = LinkModel(resolve_profile(profile), seed)
        self._deliver = deliver
        self._stats = DirectionStats()
        self._pending: deque[tuple[float, bytes, Address, Deliver]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._firing = False
        self._closed = False

    def __repr__(self) -> str:
        return f"LinkDirection({self.name}, {self._model.profile.name})"

    @property
    def profile(self) -> LinkProfile:
        return self._model.profile

    @property
    def model(self) -> LinkModel:
        """The underlying model (its random state advances with every packet)."""
        return self._model

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Packets accepted and not yet delivered."""
        return len(self._pending)

    def set_profile(self, profile: LinkProfile | str) -> None:
        self._model.set_profile(resolve_profile(profile))

    def stats(self) -> DirectionStats:
        return replace(self._stats)

    def send(self, data: bytes, addr: Address = None, deliver: Deliver | None = None) -> Fate:
        """Offer a packet to the link now; returns what the link did with it."""
        if self._closed:
            return Fate.CLOSED
        target = deliver if deliver is not None else self._deliver
        if target is None:
            raise ValueError(f"{self!r}: no deliver callback for this packet")
        loop = self._bind_loop()
        verdict = self._model.offer(loop.time(), len(data))
        self._stats.sent += 1
        self._stats.bytes_sent += len(data)
        if verdict.fate is Fate.QUEUE_DROP:
            self._stats.dropped_queue += 1
        elif verdict.fate is Fate.LOSS:
            self._stats.dropped_loss += 1
        else:
            self._pending.append((verdict.at, bytes(data), addr, target))
            if self._timer is None and not self._firing:
                self._arm(loop)
        return verdict.fate

    def close(self) -> None:
        """Cancel pending deliveries; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"{self!r} is bound to another event loop")
        return loop

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_at(self._pending[0][0], self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time() + _CLOCK_SLACK
        self._firing = True
        try:
            while self._pending and self._pending[0][0] <= now and not self._closed:
                _, data, addr, target = self._pending.popleft()
                self._stats.delivered += 1
                self._stats.bytes += len(data)
                try:
                    target(data, addr)
                except Exception:
                    logger.exception("%r: deliver callback failed", self)
        finally:
            self._firing = False
        if self._pending and not self._closed:
            self._arm(loop)


class LinkEmulator:
    """Both directions of a participant's link, from one profile and one seed.

    ``up`` carries what the participant sends, ``down`` what it receives. The
    directions get different seeds derived from ``seed``.
    """

    def __init__(
        self, profile: LinkProfile | str = "lan", *, seed: int = 0, name: str = "link"
    ) -> None:
        resolved = resolve_profile(profile)
        self.name = name
        self.up = LinkDirection(resolved, seed=f"linkemu:{seed}:up", name=f"{name}/up")
        self.down = LinkDirection(resolved, seed=f"linkemu:{seed}:down", name=f"{name}/down")
        self._profile = resolved
        self._closed = False

    def __repr__(self) -> str:
        return f"LinkEmulator({self.name}, {self._profile.name})"

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    @property
    def closed(self) -> bool:
        return self._closed

    def set_profile(self, profile: LinkProfile | str) -> LinkProfile:
        resolved = resolve_profile(profile)
        if resolved != self._profile:
            logger.info("%s: profile %s -> %s", self.name, self._profile.name, resolved.name)
        self._profile = resolved
        self.up.set_profile(resolved)
        self.down.set_profile(resolved)
        return resolved

    def stats(self) -> EmulatorStats:
        return EmulatorStats(self._profile.name, self.up.stats(), self.down.stats())

    def close(self) -> None:
        """Cancel all pending deliveries; later packets are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.up.close()
        self.down.close()


class LinkSchedule:
    """Plays ``(profile, seconds)`` phases on an emulator, e.g. a link that degrades
    then recovers. Phase boundaries are on absolute loop time, so they do not drift.

    ``on_phase(index, profile)`` is called right after each phase's profile is set.
    The last profile stays in force when the schedule ends. Use :meth:`start` /
    :meth:`stop`, ``await schedule.wait()``, or ``async with``.
    """

    def __init__(
        self,
        emulator: LinkEmulator,
        phases: Sequence[tuple[LinkProfile | str, float]],
        *,
        on_phase: OnPhase | None = None,
    ) -> None:
        if not phases:
            raise ValueError("LinkSchedule needs at least one phase")
        resolved: list[tuple[LinkProfile, float]] = []
        for profile, seconds in phases:
            if seconds < 0:
                raise ValueError(f"phase duration must be >= 0, got {seconds}")
            resolved.append((resolve_profile(profile), float(seconds)))
        self.emulator = emulator
        self.phases: tuple[tuple[LinkProfile, float], ...] = tuple(resolved)
        self._on_phase = on_phase
        self._task: asyncio.Task[None] | None = None
        self.phase_index: int | None = None

    @property
    def duration(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def run(self) -> None:
        """Play all phases in the current task."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        for index, (profile, seconds) in enumerate(self.phases):
            self.emulator.set_profile(profile)
            self.phase_index = index
            if self._on_phase is not None:
                self._on_phase(index, profile)
            deadline += seconds
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    async def wait(self) -> None:
        await self.start()

    def stop(self) -> None:
        """Stop playing (the current profile stays); safe to call twice."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def __aenter__(self) -> LinkSchedule:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        task = self._task
        if task is None:
            return
        await asyncio.wait([task])
        error = None if task.cancelled() else task.exception()
        if exc is None and error is not None:
            raise error
