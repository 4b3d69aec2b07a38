"""BandwidthEstimator: REMB and loss rule, down fast, up slowly, no flapping."""

from __future__ import annotations

import itertools

import pytest

from media_server.estimator import BandwidthEstimator, EstimatorConfig

REPORT_EVERY = 0.5


def deliver(est: BandwidthEstimator, bps: int, start: float, end: float) -> None:
    """Hand the estimator a steady delivered rate, in 100 ms chunks."""
    t = start
    while t < end - 1e-9:
        est.on_delivered(bps // 80, t)
        t += 0.1


def frange(start: float, end: float, step: float) -> list[float]:
    n = round((end - start) / step)
    return [start + i * step for i in range(n + 1)]


def test_remb_drop_is_followed_immediately_and_a_rise_is_not() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=1_000_000))
    assert est.estimate_bps(0.0) == 1_000_000
    est.on_remb(300_000, 1.0)
    assert est.estimate_bps(1.0) == 300_000
    est.on_remb(2_000_000, 1.1)
    assert est.estimate_bps(1.1) == 300_000  # a rise waits for clean loss reports


def test_loss_of_20_percent_cuts_within_one_second() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=1_000_000))
    deliver(est, 800_000, 0.0, 3.0)
    est.on_receiver_report(0.0, 0.1, 1.5)
    assert est.estimate_bps(2.0) == 1_000_000
    # 20 % loss reported from t=2.0 on, every 0.5 s
    est.on_receiver_report(0.2, 0.1, 2.0)
    after = est.estimate_bps(2.0)
    assert after <= 800_000 * 0.9 * 1.02  # cut from the delivered rate, at once
    est.on_receiver_report(0.2, 0.1, 2.5)
    assert est.estimate_bps(2.5) < after  # keeps cutting while the loss lasts
    assert est.snapshot(2.5).state == "decrease"


def test_report_blocks_of_one_compound_cut_once() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=1_000_000))
    for _ in range(3):  # audio + two videos, same instant
        est.on_receiver_report(0.3, 0.6, 5.0)
    assert est.estimate_bps(5.0) == int(1_000_000 * 0.85)
    est.on_receiver_report(0.3, 0.6, 5.5)  # within 300 ms + RTT of the cut
    assert est.estimate_bps(5.5) == int(1_000_000 * 0.85)
    est.on_receiver_report(0.3, 0.6, 6.0)
    assert est.estimate_bps(6.0) < int(1_000_000 * 0.85)


def test_cut_uses_the_delivered_rate_when_below_the_estimate() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=5_000_000))
    deliver(est, 300_000, 0.0, 2.05)  # the last chunk at 2.0
    est.on_receiver_report(0.2, None, 2.0)
    assert est.estimate_bps(2.0) == pytest.approx(300_000 * 0.9, rel=0.05)


def test_recovery_waits_two_seconds_then_climbs_at_most_8_percent_a_second() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=1_000_000))
    est.on_remb(10_000_000, 0.0)
    est.on_receiver_report(0.5, 0.1, 0.0)
    low = est.estimate_bps(0.0)
    assert low == 750_000
    samples: list[tuple[float, int]] = []
    for t in frange(0.1, 20.0, 0.1):
        if abs(t / REPORT_EVERY - round(t / REPORT_EVERY)) < 1e-6:
            est.on_receiver_report(0.0, 0.1, t)
        samples.append((t, est.estimate_bps(t)))
    # nothing for the first 2 s of clean reports (the first arrives at 0.5 s)
    assert all(v == low for t, v in samples if t <= 2.5 + 1e-9)
    # never more than +8 % over any second
    for (_, v0), (_, v1) in itertools.pairwise(samples):
        assert v1 >= v0
    per_second = round(1.0 / 0.1)
    for (_, v), (_, later) in zip(samples, samples[per_second:], strict=False):
        assert later <= v * 1.08 + 2  # + int truncation
    # and it does climb: 17.5 s of growth at 8 %/s
    assert samples[-1][1] >= low * 1.08**17
    assert est.snapshot(20.0).state == "increase"


def _after_a_cut(remb_at: float) -> BandwidthEstimator:
    """A 1 Mbit/s REMB passed on at ``remb_at``, a 90 % loss cut at t=10 (-> 550 kbit/s),
    then clean reports every 0.5 s up to 13.5 s (the rise may start at 12.5 s)."""
    est = BandwidthEstimator(
        EstimatorConfig(initial_bps=1_000_000, remb_recovery_fraction=0.7, remb_recovery_per_s=0.5)
    )
    est.on_remb(1_000_000, remb_at)
    est.on_receiver_report(0.9, 0.1, 10.0)
    assert est.estimate_bps(10.0) == 550_000
    for t in frange(10.5, 13.5, 0.5):
        est.on_receiver_report(0.0, 0.1, t)
    return est


def test_a_clean_link_climbs_back_quickly_to_a_share_of_a_fresh_remb() -> None:
    est = _after_a_cut(remb_at=9.0)
    # one second at +50 %/s reaches 70 % of the REMB
    assert est.estimate_bps(13.5) == pytest.approx(700_000, rel=0.01)


def test_an_old_remb_is_no_target_for_the_quick_climb() -> None:
    est = _after_a_cut(remb_at=4.0)  # 8.5 s before the rise: another moment of the link
    assert est.estimate_bps(13.5) <= 550_000 * 1.08 + 2  # the slow rise only


def test_increase_never_passes_remb_or_ceiling() -> None:
    cfg = EstimatorConfig(initial_bps=500_000, ceiling_bps=2_000_000)
    est = BandwidthEstimator(cfg)
    for t in frange(0.0, 30.0, 0.5):
        est.on_remb(600_000, t)
        est.on_receiver_report(0.0, None, t)
    assert est.estimate_bps(30.0) == 600_000
    for t in frange(30.5, 120.0, 0.5):
        est.on_remb(50_000_000, t)
        est.on_receiver_report(0.0, None, t)
    assert est.estimate_bps(120.0) == 2_000_000


def test_a_stale_remb_stops_capping() -> None:
    """aiortc sends REMB per video stream: a paused video's last REMB must not pin it down."""
    est = BandwidthEstimator(EstimatorConfig(initial_bps=500_000))
    est.on_remb(100_000, 0.0)
    for t in frange(0.5, 5.0, 0.5):
        est.on_receiver_report(0.0, None, t)
    assert est.estimate_bps(5.0) == 100_000
    for t in frange(5.5, 15.0, 0.5):
        est.on_receiver_report(0.0, None, t)
    assert 100_000 * 1.08**9 <= est.estimate_bps(15.0) <= 100_000 * 1.08**10.01


def test_floor_holds_under_any_remb_or_loss() -> None:
    est = BandwidthEstimator(EstimatorConfig(floor_bps=40_000))
    est.on_remb(1_000, 0.0)
    assert est.estimate_bps(0.0) == 40_000
    for t in frange(1.0, 30.0, 1.0):
        est.on_receiver_report(1.0, 0.5, t)
    assert est.estimate_bps(30.0) == 40_000


def test_no_increase_without_receiver_reports() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=300_000))
    est.on_remb(5_000_000, 0.0)
    assert est.estimate_bps(60.0) == 300_000


@pytest.mark.parametrize("pattern", [(0.03, 0.07, 0.04, 0.06), (0.01, 0.09), (0.05,)])
def test_no_flapping_when_loss_hovers_around_5_percent(pattern: tuple[float, ...]) -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=600_000))
    est.on_remb(2_000_000, 0.0)
    deliver(est, 550_000, 0.0, 60.0)
    seen = set()
    losses = itertools.cycle(pattern)
    for t in frange(0.5, 60.0, REPORT_EVERY):
        est.on_receiver_report(next(losses), 0.6, t)
        seen.add(est.estimate_bps(t))
    assert seen == {600_000}
    assert est.decreases == 0 and est.increases == 0
    assert est.snapshot(60.0).state == "hold"


def test_delivered_rate_over_the_last_second() -> None:
    est = BandwidthEstimator()
    assert est.delivered_bps(0.0) is None
    deliver(est, 400_000, 0.0, 0.3)
    assert est.delivered_bps(0.3) is None  # less than half a window seen
    deliver(est, 400_000, 0.3, 3.0)
    assert est.delivered_bps(2.95) == pytest.approx(400_000, rel=0.02)
    assert est.delivered_bps(10.0) == 0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        EstimatorConfig(floor_bps=100_000, initial_bps=50_000)
    with pytest.raises(ValueError):
        EstimatorConfig(loss_increase_below=0.2, loss_decrease_above=0.1)


def test_loss_of_a_few_packets_is_pooled_until_20_are_covered() -> None:
    """One lost packet of a 5-packet report is random loss, not a 20 % loss event."""
    est = BandwidthEstimator(EstimatorConfig(initial_bps=300_000))
    deliver(est, 300_000, 0.0, 2.0)
    est.on_receiver_report(0.2, 0.6, 2.0, expected=5)  # 1 of 5 lost
    assert est.estimate_bps(2.0) == 300_000
    est.on_receiver_report(0.0, 0.6, 2.1, expected=50)  # pooled: 1 of 55 lost
    assert est.estimate_bps(2.1) == 300_000
    assert est.snapshot(2.1).fraction_lost == pytest.approx(1 / 55)


def test_pooled_heavy_loss_still_cuts() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=300_000))
    deliver(est, 300_000, 0.0, 2.0)
    for i in range(4):  # 5 packets each, 2 lost: pooled to 40 % over 20
        est.on_receiver_report(0.4, 0.6, 2.0 + i * 0.05, expected=5)
    assert est.estimate_bps(2.2) < 300_000 * 0.85


def test_a_report_covering_no_packets_only_updates_rtt() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=300_000))
    est.on_receiver_report(1.0, 0.7, 1.0, expected=0)
    assert est.estimate_bps(1.0) == 300_000
    assert est.snapshot(1.0).rtt_s == pytest.approx(0.7)


def carry(
    est: BandwidthEstimator, bps: int, start: float, end: float, losses: dict[float, float]
) -> None:
    """Deliver ``bps`` in 100 ms chunks; at each time in ``losses``, a 100-packet report."""
    for t in frange(start, end, 0.1):
        est.on_delivered(bps // 80, t)
        for at, loss in losses.items():
            if abs(at - t) < 1e-6:
                est.on_receiver_report(loss, 0.6, t, expected=100)


def clean_every_half_second(start: float, end: float) -> dict[float, float]:
    return {t: 0.0 for t in frange(start, end, 0.5)}


def test_clean_reports_lift_a_deep_cut_to_what_is_delivered() -> None:
    est = BandwidthEstimator(
        EstimatorConfig(initial_bps=60_000, delivered_floor_share=0.9, increase_per_s=0.0)
    )
    # the link carries 300 kbit/s of audio cleanly; clean since 0.5 s, 2.5 s by the last report
    carry(est, 300_000, 0.0, 3.0, clean_every_half_second(0.5, 3.0))
    delivered = est.delivered_bps(3.0)
    assert delivered is not None and delivered > 250_000
    assert est.estimate_bps(3.0) == pytest.approx(0.9 * delivered, rel=0.01)


def test_one_clean_report_amid_lossy_ones_does_not_lift_to_what_is_delivered() -> None:
    """What we hand the transport is not what got through: 1.8 Mbit/s into 300 kbit/s."""
    est = BandwidthEstimator(EstimatorConfig(initial_bps=300_000, delivered_floor_share=0.9))
    # the clean ones: pools of audio that a full queue let through
    carry(est, 1_800_000, 0.0, 3.0, {2.0: 0.6, 2.5: 0.0, 3.0: 0.0})
    assert est.estimate_bps(3.0) < 300_000


def test_the_delivered_floor_respects_a_lower_remb() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=60_000, delivered_floor_share=0.9))
    est.on_remb(100_000, 0.0)
    carry(est, 300_000, 0.0, 3.0, clean_every_half_second(0.5, 3.0))
    assert est.estimate_bps(3.0) <= 100_000


def test_the_delivered_floor_is_off_by_default() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=60_000, increase_per_s=0.0))
    carry(est, 300_000, 0.0, 3.0, clean_every_half_second(0.5, 3.0))
    assert est.estimate_bps(3.0) == 60_000


def test_moderate_loss_pools_on_to_judge_loss_packets_or_judge_after_s() -> None:
    """At 2 % random loss one packet in a 20-packet pool reads 5 %: pool on."""
    cfg = EstimatorConfig(initial_bps=300_000, judge_loss_packets=60, judge_after_s=1.0)
    est = BandwidthEstimator(cfg)
    deliver(est, 300_000, 0.0, 2.0)
    est.on_receiver_report(0.05, 0.6, 2.0, expected=20)  # 1 of 20: not judged yet
    assert est.snapshot(2.0).fraction_lost is None
    est.on_receiver_report(0.0, 0.6, 2.2, expected=40)  # 1 of 60: judged, clean
    assert est.snapshot(2.2).fraction_lost == pytest.approx(1 / 60)
    est.on_receiver_report(0.05, 0.6, 3.0, expected=20)
    est.on_receiver_report(0.05, 0.6, 4.1, expected=20)  # 40 packets, but over a second
    assert est.snapshot(4.1).fraction_lost == pytest.approx(0.05)
    # heavy loss is judged as soon as 20 packets are covered
    est.on_receiver_report(0.5, 0.6, 4.2, expected=20)
    assert est.snapshot(4.2).fraction_lost == pytest.approx(0.5)
    assert est.estimate_bps(4.2) < 300_000


def test_a_rise_limit_stops_the_rise_without_cutting() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=200_000))
    est.rise_limit_bps = 210_000
    for t in frange(0.0, 10.0, REPORT_EVERY):
        est.on_receiver_report(0.0, 0.6, t)
    assert est.estimate_bps(10.0) == 210_000
    est.rise_limit_bps = 100_000
    assert est.estimate_bps(10.5) == 210_000  # a limit on the rise, not a cut


def test_a_new_path_starts_again_from_the_start_value() -> None:
    est = BandwidthEstimator(EstimatorConfig(initial_bps=1_000_000))
    est.on_remb(50_000, 1.0)  # EDGE
    assert est.estimate_bps(1.0) == 50_000
    est.on_new_path(300_000, 2.0)
    assert est.estimate_bps(2.0) == 300_000
    est.on_receiver_report(0.0, 0.002, 4.5)
    assert est.estimate_bps(5.0) > 300_000  # the old REMB no longer caps the rise
    est.on_new_path(100_000, 6.0)  # never lower
    assert est.estimate_bps(6.0) > 300_000
