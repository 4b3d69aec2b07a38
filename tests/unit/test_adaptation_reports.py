"""SubscriberAdaptation: what receiver reports say about the link (pure, no media)."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from media_server.adaptation import LadderPool, SubscriberAdaptation
from media_server.downtrack import DownTrack
from media_server.hooks import ReceiverReport
from media_server.subscriber import Slot

BPS = 400_000


async def _repeating(repeated_for: float) -> tuple[SubscriberAdaptation, Slot, float]:
    """A subscriber sent BPS of one video for 8 s, each packet twice for ``repeated_for``."""
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    slot = Slot("video", DownTrack("video", "t"), cast(Any, None))  # no track: delivery only
    now = time.monotonic()
    t = now - 8.0
    while t <= now:
        slot.downtrack.wire_bytes_forwarded += BPS // 8 // 2
        await adaptation.tick([slot], now=t)
        t += 0.5
    adaptation._repeat(slot, 2, now - repeated_for)
    delivered = adaptation.estimator.delivered_bps(now)
    assert delivered is not None
    return adaptation, slot, delivered


def _block(fraction_lost: float, packets_lost: int, highest: int) -> ReceiverReport:
    return ReceiverReport(fraction_lost, packets_lost, 0, highest, rtt_s=0.7, rtt_sample_s=0.7)


async def test_a_receiver_counting_both_copies_hides_80_percent_loss_as_60() -> None:
    """aiortc: EDGE after satellite, 4 of 5 copies lost; the cut goes to what got through."""
    adaptation, slot, delivered = await _repeating(5.0)
    on_report = adaptation.feedback(slot.downtrack).on_report
    on_report(_block(0.0, 0, 1000))  # origin
    on_report(_block(0.0, -60, 1060))  # 60 packets, 120 copies received: it counts both
    assert adaptation.estimator.estimate_bps(time.monotonic()) > delivered
    # 60 packets, 120 copies sent, 24 received: cumulative loss up by 36, "60 %"
    on_report(_block(0.6, -24, 1120))
    assert adaptation.estimator.judged_loss == pytest.approx(0.8)
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= 0.21 * delivered


async def test_a_receiver_counting_one_copy_per_packet_is_taken_as_it_reports() -> None:
    """libwebrtc counts the RTX copy on the RTX stream: the media stream's loss is the copies'."""
    adaptation, slot, delivered = await _repeating(5.0)
    on_report = adaptation.feedback(slot.downtrack).on_report
    on_report(_block(0.0, 0, 1000))
    on_report(_block(0.02, 1, 1060))  # 59 of 60
    on_report(_block(0.3, 19, 1120))  # 42 of 60
    assert adaptation.estimator.judged_loss == pytest.approx(0.3)
    assert adaptation.estimator.estimate_bps(time.monotonic()) == pytest.approx(
        0.7 * delivered, rel=0.02
    )


async def test_just_after_repeats_start_a_report_is_taken_as_it_is() -> None:
    """It may be about packets sent once: more received than expected would read as loss."""
    adaptation, slot, delivered = await _repeating(1.0)
    on_report = adaptation.feedback(slot.downtrack).on_report
    on_report(_block(0.0, 0, 1000))
    on_report(_block(0.0, -30, 1060))  # half of the packets sent twice, none lost
    on_report(_block(0.0, -90, 1120))
    assert adaptation.estimator.judged_loss == 0.0
    assert adaptation.estimator.estimate_bps(time.monotonic()) > delivered


async def test_the_link_s_loss_is_weighed_by_the_bytes_each_stream_sent() -> None:
    """A few big video packets lost count for more than many small audio ones kept."""
    adaptation, video, _ = await _repeating(0.0)
    adaptation._repeat(video, 1, time.monotonic())
    audio = Slot("audio", DownTrack("audio", "t"), cast(Any, None))
    on_video = adaptation.feedback(video.downtrack).on_report
    on_audio = adaptation.feedback(audio.downtrack).on_report
    on_video(_block(0.0, 0, 1000))  # origins
    on_audio(_block(0.0, 0, 1000))
    video.downtrack.wire_bytes_forwarded += 15 * 1200
    audio.downtrack.wire_bytes_forwarded += 50 * 100
    on_video(_block(0.8, 12, 1015))
    on_audio(_block(0.04, 2, 1050))
    assert adaptation.estimator.judged_loss == pytest.approx((0.8 * 18_000 + 0.04 * 5_000) / 23_000)


def _rtt(rtt: float, highest: int) -> ReceiverReport:
    return ReceiverReport(0.0, 0, 0, highest, rtt_s=rtt, rtt_sample_s=rtt)


async def test_a_shorter_path_starts_the_estimate_again() -> None:
    """EDGE -> LAN: the estimate left at the 40 kbit/s floor is about a path that is gone."""
    adaptation, slot, _ = await _repeating(0.0)
    on_report = adaptation.feedback(slot.downtrack).on_report
    adaptation.estimator.on_remb(40_000, time.monotonic())
    for i in range(5):
        on_report(_rtt(0.75, 1000 + 10 * i))
    assert adaptation.estimator.estimate_bps(time.monotonic()) == 40_000
    on_report(_rtt(0.002, 1060))
    on_report(_rtt(0.002, 1070))
    assert adaptation.estimator.estimate_bps(time.monotonic()) >= 300_000
