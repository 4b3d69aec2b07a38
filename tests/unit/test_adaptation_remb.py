"""SubscriberAdaptation: which REMBs are evidence of congestion (pure, no media)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from media_server import hooks
from media_server.adaptation import LadderPool, SubscriberAdaptation
from media_server.downtrack import DownTrack
from media_server.subscriber import Slot

VIDEO_BPS = 400_000


async def adaptation_delivering(seconds: float) -> tuple[SubscriberAdaptation, DownTrack]:
    """A subscriber that was sent VIDEO_BPS of video for ``seconds`` up to now."""
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    downtrack = DownTrack("video", "t")
    slot = Slot("video", downtrack, cast(Any, None))  # no track bound: only delivery counts
    now = time.monotonic()
    t = now - seconds
    while t <= now:
        downtrack.wire_bytes_forwarded += VIDEO_BPS // 8 // 2
        await adaptation.tick([slot], now=t)
        t += 0.5
    return adaptation, downtrack


async def test_a_per_stream_remb_falling_below_the_video_delivered_is_followed() -> None:
    adaptation, downtrack = await adaptation_delivering(8.0)
    before = adaptation.estimator.estimate_bps(time.monotonic())
    feedback = adaptation.feedback(downtrack)
    feedback.on_remb(int(VIDEO_BPS * 0.95), [1234])
    feedback.on_remb(int(VIDEO_BPS * 0.8), [1234])
    after = adaptation.estimator.estimate_bps(time.monotonic())
    assert after < before
    assert after <= VIDEO_BPS * 0.8


async def test_a_per_stream_remb_a_little_below_what_is_sent_is_not_congestion() -> None:
    adaptation, downtrack = await adaptation_delivering(8.0)
    before = adaptation.estimator.estimate_bps(time.monotonic())
    adaptation.feedback(downtrack).on_remb(int(VIDEO_BPS * 0.95), [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) == before


async def test_remb_during_warm_up_is_ignored() -> None:
    adaptation, downtrack = await adaptation_delivering(3.0)
    before = adaptation.estimator.estimate_bps(time.monotonic())
    adaptation.feedback(downtrack).on_remb(50_000, [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) == before


async def test_a_remb_ramping_up_from_its_start_value_is_not_congestion() -> None:
    """libwebrtc starts low and climbs: below what we send, but rising."""
    adaptation, downtrack = await adaptation_delivering(8.0)
    before = adaptation.estimator.estimate_bps(time.monotonic())
    feedback = adaptation.feedback(downtrack)
    for share in (0.5, 0.55, 0.6, 0.7):
        feedback.on_remb(int(VIDEO_BPS * share), [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) == before


def _report(rtt_sample: float, highest: int) -> hooks.ReceiverReport:
    return hooks.ReceiverReport(0.0, 0, 0, highest, rtt_s=rtt_sample, rtt_sample_s=rtt_sample)


async def test_a_remb_fall_that_round_trips_do_not_confirm_is_not_followed() -> None:
    """Satellite jitter makes delay-based detectors fire with no queue: not congestion."""
    adaptation, downtrack = await adaptation_delivering(8.0)
    feedback = adaptation.feedback(downtrack)
    for i, rtt in enumerate([0.60, 0.62, 0.59, 0.61]):  # a steady 600 ms link
        feedback.on_report(_report(rtt, 100 * (i + 1)))
    before = adaptation.estimator.estimate_bps(time.monotonic())
    feedback.on_remb(int(VIDEO_BPS * 0.95), [1234])
    feedback.on_remb(int(VIDEO_BPS * 0.6), [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) == before
    assert adaptation.rembs_unconfirmed == 1
    # the queue shows in the next round trips: the fall is followed after all
    feedback.on_report(_report(0.59 + 0.3, 500))
    feedback.on_report(_report(0.59 + 0.3, 600))
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= VIDEO_BPS * 0.6


async def test_a_remb_fall_with_a_grown_round_trip_is_followed_at_once() -> None:
    adaptation, downtrack = await adaptation_delivering(8.0)
    feedback = adaptation.feedback(downtrack)
    for i, rtt in enumerate([0.05, 0.05, 0.05, 0.4, 0.4]):  # 350 ms of queue
        feedback.on_report(_report(rtt, 100 * (i + 1)))
    feedback.on_remb(int(VIDEO_BPS * 0.95), [1234])
    feedback.on_remb(int(VIDEO_BPS * 0.6), [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= VIDEO_BPS * 0.6
    assert adaptation.rembs_unconfirmed == 0


async def test_a_small_queue_confirms_one_back_off_not_a_deeper_fall() -> None:
    """Satellite: one sample pair 100 ms over the floor, aiortc's REMB at 0.45x."""
    adaptation, downtrack = await adaptation_delivering(8.0)
    feedback = adaptation.feedback(downtrack)
    for i, rtt in enumerate([0.60, 0.61, 0.59, 0.69, 0.69]):
        feedback.on_report(_report(rtt, 100 * (i + 1)))
    before = adaptation.estimator.estimate_bps(time.monotonic())
    feedback.on_remb(int(VIDEO_BPS * 0.95), [1234])
    feedback.on_remb(int(VIDEO_BPS * 0.45), [1234])
    after = adaptation.estimator.estimate_bps(time.monotonic())
    assert after < before
    assert 0.8 * VIDEO_BPS <= after <= 0.86 * VIDEO_BPS  # no audio: all of it is video
    assert adaptation.rembs_bounded == 1
    # a queue that grows by its threshold again confirms the next fall, in full
    feedback.on_report(_report(0.85, 600))
    feedback.on_report(_report(0.85, 700))
    feedback.on_remb(int(VIDEO_BPS * 0.4), [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= 0.4 * VIDEO_BPS + 60_000


async def test_a_remb_far_below_what_is_sent_is_a_link_drop_followed_in_full() -> None:
    """LAN -> 3G: the first round trips show 80 ms while the receiver gets a sixth."""
    adaptation, downtrack = await adaptation_delivering(8.0)
    feedback = adaptation.feedback(downtrack)
    for i, rtt in enumerate([0.002, 0.002, 0.003, 0.085, 0.085]):
        feedback.on_report(_report(rtt, 100 * (i + 1)))
    feedback.on_remb(int(VIDEO_BPS * 0.95), [1234])
    feedback.on_remb(int(VIDEO_BPS * 0.15), [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= 0.15 * VIDEO_BPS
    assert adaptation.rembs_bounded == 0


async def test_one_queue_answers_one_remb_fall_unless_it_grows() -> None:
    """After a step in delay aiortc's REMB falls at every report: one cut, not five."""
    adaptation, downtrack = await adaptation_delivering(8.0)
    feedback = adaptation.feedback(downtrack)
    for i, rtt in enumerate([0.15, 0.15, 0.15, 0.6, 0.6]):  # 450 ms more than a moment ago
        feedback.on_report(_report(rtt, 100 * (i + 1)))
    feedback.on_remb(int(VIDEO_BPS * 0.95), [1234])
    feedback.on_remb(int(VIDEO_BPS * 0.6), [1234])
    first = adaptation.estimator.estimate_bps(time.monotonic())
    assert first <= VIDEO_BPS * 0.6
    feedback.on_report(_report(0.61, 600))  # the same level
    feedback.on_remb(int(VIDEO_BPS * 0.4), [1234])
    assert adaptation.estimator.estimate_bps(time.monotonic()) == first
    assert adaptation.rembs_unconfirmed == 1
    feedback.on_report(_report(0.9, 700))  # the queue grew: news, and the fall is followed
    feedback.on_report(_report(0.9, 800))
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= VIDEO_BPS * 0.4


async def test_a_flat_round_trip_with_heavy_loss_is_a_full_queue_not_a_new_link() -> None:
    adaptation, downtrack = await adaptation_delivering(8.0)
    feedback = adaptation.feedback(downtrack)
    start = time.monotonic()
    for i in range(8):  # 3G's round trips, 6 to 2.5 s ago
        adaptation.queue_delay.add(0.15, start - 6.0 + 0.5 * i)
    feedback.on_report(_report(0.55, 100))  # the stream's origin
    highest = 100
    while time.monotonic() - start < 1.2:  # 1.2 s flat at 550 ms, a third lost
        highest += 100
        lossy = hooks.ReceiverReport(0.33, 0, 0, highest, rtt_s=0.55, rtt_sample_s=0.55)
        feedback.on_report(lossy)
        await asyncio.sleep(0.1)
    assert adaptation.queue_delay.new_links == 0
    assert adaptation.queue_delay.confirms(time.monotonic())


async def test_on_a_lossy_long_rtt_link_the_rise_stops_at_1_5x_what_is_delivered() -> None:
    adaptation, downtrack = await adaptation_delivering(8.0)
    assert adaptation.estimator.rise_limit_bps is None  # a clean, short link: no limit
    adaptation.video_repeat.decide(0.02, 0.6, 0, 45_000)  # satellite: lossy, 600 ms
    slot = Slot("video", downtrack, cast(Any, None))
    downtrack.wire_bytes_forwarded += VIDEO_BPS // 8 // 2
    await adaptation.tick([slot], now=time.monotonic() + 0.5)
    limit = adaptation.estimator.rise_limit_bps
    assert limit is not None and 1.3 * VIDEO_BPS < limit < 1.7 * VIDEO_BPS + 10_000


async def test_a_shorter_path_starts_the_estimate_again() -> None:
    """EDGE -> LAN: the estimate left at the 40 kbit/s floor is about a path that is gone."""
    adaptation, downtrack = await adaptation_delivering(8.0)
    on_report = adaptation.feedback(downtrack).on_report
    adaptation.estimator.on_remb(40_000, time.monotonic())
    for i in range(5):
        on_report(_report(0.75, 1000 + 10 * i))
    assert adaptation.estimator.estimate_bps(time.monotonic()) == 40_000
    on_report(_report(0.002, 1060))
    assert adaptation.estimator.estimate_bps(time.monotonic()) == 40_000  # one sample is not
    on_report(_report(0.002, 1070))
    assert adaptation.estimator.estimate_bps(time.monotonic()) >= 300_000
