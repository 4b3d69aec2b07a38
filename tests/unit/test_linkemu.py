"""Link emulator: profiles, the pure link model, and its asyncio driver.

Statistical properties (10 000 packets) run on :class:`LinkModel` in simulated
time; scheduling runs on the real asyncio loop with short real durations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics

import pytest
from aioice.ice import StunProtocol
from aiortc import RTCPeerConnection

from media_server.linkemu import (
    PROFILES,
    Fate,
    LinkDirection,
    LinkEmulator,
    LinkModel,
    LinkProfile,
    LinkSchedule,
    check_hooks,
    get_profile,
)

# --- profiles ---------------------------------------------------------------


def test_profiles_are_the_named_set_with_the_design_numbers() -> None:
    assert set(PROFILES) == {"lan", "lte", "3g", "satellite", "edge"}
    expected = {
        "lan": (None, 1.0, 0.0),
        "lte": (10_000_000, 50.0, 0.005),
        "3g": (450_000, 150.0, 0.01),
        "satellite": (300_000, 600.0, 0.02),
        "edge": (64_000, 750.0, 0.03),
    }
    for name, (rate, rtt, loss) in expected.items():
        p = get_profile(name)
        assert (p.name, p.rate_bps, p.rtt_ms, p.loss) == (name, rate, rtt, loss)
        assert p.one_way_ms == rtt / 2
        assert 0 <= p.jitter_ms <= 20
        if rate is not None:
            assert 300 <= p.queue_ms <= 500


def test_unknown_profile_lists_the_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        get_profile("dialup")
    for name in PROFILES:
        assert name in str(info.value)


def test_profile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        LinkProfile("x", rate_bps=0, rtt_ms=1, jitter_ms=0, loss=0, queue_ms=100)
    with pytest.raises(ValueError):
        LinkProfile("x", rate_bps=None, rtt_ms=1, jitter_ms=0, loss=1.5, queue_ms=100)


# --- the model, simulated time ---------------------------------------------


def offer_paced(model: LinkModel, count: int, size: int, interval: float) -> list[Fate]:
    return [model.offer(i * interval, size).fate for i in range(count)]


@pytest.mark.parametrize("name", ["satellite", "edge"])
def test_loss_fraction_matches_profile(name: str) -> None:
    profile = get_profile(name)
    assert profile.rate_bps is not None
    size = 100
    interval = 1.25 * size * 8 / profile.rate_bps  # 80 % of the rate: no queue drops
    fates = offer_paced(LinkModel(profile, seed=7), 10_000, size, interval)
    assert fates.count(Fate.QUEUE_DROP) == 0
    loss = fates.count(Fate.LOSS) / len(fates)
    assert abs(loss - profile.loss) <= 0.005, loss


def test_delay_stays_within_jitter_bounds_and_never_reorders() -> None:
    profile = get_profile("satellite")
    assert profile.rate_bps is not None
    model = LinkModel(profile, seed=3)
    size = 200
    tx = size * 8 / profile.rate_bps
    delays = []
    for i in range(10_000):
        now = i * 0.05  # far apart: no queueing, no reordering clamp
        verdict = model.offer(now, size)
        if verdict.fate is Fate.DELIVER:
            delays.append((verdict.at - now - tx) * 1000)
    low = profile.one_way_ms - profile.jitter_ms
    high = profile.one_way_ms + profile.jitter_ms
    assert low - 1e-6 <= min(delays) < low + 1
    assert high - 1 < max(delays) <= high + 1e-6
    assert abs(statistics.fmean(delays) - profile.one_way_ms) < 1

    # Packets 1 ms apart with 15 ms jitter would overtake each other: they must not,
    # and the ordering clamp must not push any delay past the jitter bound.
    lan_jittery = dataclasses.replace(profile, name="j", rate_bps=None, jitter_ms=15)
    model = LinkModel(lan_jittery, seed=3)
    sent = [i * 0.001 for i in range(2000)]
    verdicts = [(now, model.offer(now, size)) for now in sent]
    times = [v.at for _, v in verdicts if v.fate is Fate.DELIVER]
    assert times == sorted(times)
    dense = [(v.at - now) * 1000 for now, v in verdicts if v.fate is Fate.DELIVER]
    assert low - 1e-6 <= min(dense) and max(dense) <= high + 1e-6
    assert len(set(times)) > 200  # jitter is applied, not collapsed to one value


def test_twice_the_rate_delivers_the_rate_and_drops_the_excess_at_the_queue() -> None:
    profile = get_profile("3g")
    assert profile.rate_bps is not None and profile.queue_bytes is not None
    model = LinkModel(profile, seed=1)
    size, seconds = 1000, 2.0
    interval = size * 8 / (2 * profile.rate_bps)
    count = int(seconds / interval)
    verdicts = [model.offer(i * interval, size) for i in range(count)]
    window_end = seconds + profile.one_way_ms / 1000 + profile.jitter_ms / 1000
    delivered = [v for v in verdicts if v.fate is Fate.DELIVER and v.at <= window_end]
    rate = len(delivered) * size * 8 / seconds
    assert rate == pytest.approx(profile.rate_bps * (1 - profile.loss), rel=0.10)
    # Offered 2x: the link carries `seconds` worth plus a full queue, the rest is dropped.
    carried = profile.rate_bps * seconds / 8 + profile.queue_bytes
    dropped = sum(1 for v in verdicts if v.fate is Fate.QUEUE_DROP) * size
    assert dropped == pytest.approx(count * size - carried, rel=0.10)


def test_rate_change_mid_run_takes_effect() -> None:
    model = LinkModel(get_profile("3g"), seed=1)
    size, interval = 500, 0.004  # 1 Mbit/s offered

    def carried(start: float, seconds: float) -> float:
        n = int(seconds / interval)
        fates = [model.offer(start + i * interval, size).fate for i in range(n)]
        return sum(f is not Fate.QUEUE_DROP for f in fates) * size * 8 / seconds

    fast = carried(0.0, 2.0)
    model.set_profile(get_profile("edge"))
    slow = carried(2.0, 2.0)
    assert fast == pytest.approx(450_000, rel=0.25)  # queue fill adds ~20 %
    assert slow < 100_000


def test_same_seed_same_drops_other_seed_other_drops() -> None:
    def run(seed: int) -> list[Fate]:
        return offer_paced(LinkModel(get_profile("edge"), seed=seed), 3000, 120, 0.01)

    first = run(42)
    assert first == run(42)
    assert Fate.LOSS in first and Fate.QUEUE_DROP in first
    assert first != run(43)


def test_emulator_directions_get_different_seeds() -> None:
    profile = dataclasses.replace(get_profile("edge"), name="lossy", rate_bps=None, loss=0.3)
    emulator = LinkEmulator(profile, seed=5)
    up = offer_paced(emulator.up.model, 200, 100, 0.01)
    down = offer_paced(emulator.down.model, 200, 100, 0.01)
    assert up != down
    again = LinkEmulator(profile, seed=5)
    assert offer_paced(again.up.model, 200, 100, 0.01) == up


# --- the asyncio driver, real loop ------------------------------------------


class Sink:
    """Records (payload, delivery time) in delivery order."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, float]] = []
        self.loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()

    def __call__(self, data: bytes, addr: object) -> None:
        self.got.append((data, self.loop.time()))
        self._arrived.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.got) < count:
                self._arrived.clear()
                await self._arrived.wait()


async def test_direction_delivers_in_order_after_the_one_way_delay() -> None:
    profile = get_profile("satellite")
    sink = Sink()
    direction = LinkDirection(dataclasses.replace(profile, loss=0.0), seed=9, deliver=sink)
    loop = asyncio.get_running_loop()
    sent_at = {}
    for i in range(15):
        payload = i.to_bytes(2, "big") * 50
        sent_at[payload] = loop.time()
        assert direction.send(payload, ("10.0.0.1", 5000)) is Fate.DELIVER
        await asyncio.sleep(0.02)
    await sink.wait_for(15, timeout=2)
    assert [d for d, _ in sink.got] == list(sent_at)  # in order, nothing lost
    delays = [(t - sent_at[d]) * 1000 for d, t in sink.got]
    assert min(delays) >= profile.one_way_ms - profile.jitter_ms
    assert max(delays) <= profile.one_way_ms + profile.jitter_ms + 3 + 30  # tx + loop slack
    assert max(delays) - min(delays) > 3  # jitter is really applied
    stats = direction.stats()
    assert (stats.sent, stats.delivered, stats.bytes, stats.in_flight) == (15, 15, 1500, 0)


async def test_real_loop_rate_limit_at_twice_the_rate() -> None:
    rate = 2_000_000
    profile = LinkProfile("fast", rate_bps=rate, rtt_ms=10, jitter_ms=0, loss=0, queue_ms=100)
    sink = Sink()
    direction = LinkDirection(profile, deliver=sink)
    loop = asyncio.get_running_loop()
    size, burst_every = 1250, 0.01  # 4 packets per 10 ms = 4 Mbit/s offered
    start = loop.time()
    while loop.time() - start < 1.0:
        for _ in range(4):
            direction.send(b"x" * size)
        await asyncio.sleep(burst_every)
    elapsed = loop.time() - start
    stats = direction.stats()
    await sink.wait_for(stats.sent - stats.dropped_queue, timeout=1)
    times = [t for _, t in sink.got]
    measured = (len(times) - 1) * size * 8 / (times[-1] - times[0])
    assert measured == pytest.approx(rate, rel=0.10)
    offered_bytes = stats.bytes_sent
    excess = offered_bytes - rate * elapsed / 8
    assert stats.dropped_queue * size == pytest.approx(excess, rel=0.25)
    assert stats.dropped_queue > 0.4 * stats.sent


async def test_profile_change_applies_to_new_packets_and_queued_ones_keep_schedule() -> None:
    sink = Sink()
    emulator = LinkEmulator("lan", seed=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    emulator.up.send(b"a", None, sink)
    await sink.wait_for(1, timeout=1)
    assert sink.got[0][1] - t0 < 0.05

    satellite = dataclasses.replace(get_profile("satellite"), loss=0.0)
    emulator.set_profile(satellite)
    t1 = loop.time()
    emulator.up.send(b"b", None, sink)
    emulator.set_profile("lan")  # b keeps its satellite schedule ...
    emulator.up.send(b"c", None, sink)  # ... and c cannot overtake it
    await sink.wait_for(3, timeout=2)
    assert [d for d, _ in sink.got] == [b"a", b"b", b"c"]
    assert 0.28 <= sink.got[1][1] - t1 <= 0.4

    t2 = loop.time()
    emulator.up.send(b"d", None, sink)
    await sink.wait_for(4, timeout=1)
    assert sink.got[3][1] - t2 < 0.05
    assert emulator.stats().profile == "lan"


async def test_close_cancels_pending_deliveries_and_is_idempotent() -> None:
    sink = Sink()
    emulator = LinkEmulator(dataclasses.replace(get_profile("3g"), loss=0.0))
    for _ in range(5):
        emulator.down.send(b"x" * 100, None, sink)
    assert emulator.down.pending == 5
    emulator.close()
    emulator.close()
    await asyncio.sleep(0.15)
    assert sink.got == []
    assert emulator.down.send(b"y", None, sink) is Fate.CLOSED


async def test_schedule_plays_phases_in_order() -> None:
    emulator = LinkEmulator("lan")
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, float]] = []
    phases = [("lan", 0.05), ("3g", 0.05), ("satellite", 0.05), ("edge", 0.05), ("lan", 0.0)]
    schedule = LinkSchedule(
        emulator, phases, on_phase=lambda i, p: seen.append((p.name, loop.time()))
    )
    start = loop.time()
    async with schedule:
        await asyncio.sleep(0.12)
        assert emulator.profile.name == "satellite"
        await schedule.wait()
    assert [name for name, _ in seen] == ["lan", "3g", "satellite", "edge", "lan"]
    offsets = [t - start for _, t in seen]
    for expected, got in zip([0, 0.05, 0.10, 0.15, 0.20], offsets, strict=True):
        assert got == pytest.approx(expected, abs=0.03)
    assert emulator.profile.name == "lan"


# --- private-API hooks --------------------------------------------------------


def test_check_hooks_accepts_the_installed_aiortc() -> None:
    check_hooks()


def test_check_hooks_fails_loudly_when_internals_change(monkeypatch: pytest.MonkeyPatch) -> None:
    async def send_data_elsewhere(self: StunProtocol, data: bytes, addr: object) -> None:
        pass

    monkeypatch.setattr(StunProtocol, "send_data", send_data_elsewhere)
    with pytest.raises(RuntimeError, match="send_data"):
        check_hooks()
    monkeypatch.undo()

    monkeypatch.delattr(RTCPeerConnection, "_RTCPeerConnection__gather")
    with pytest.raises(RuntimeError, match="__gather"):
        check_hooks()
