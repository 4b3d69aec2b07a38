"""SubscriberAdaptation: which receiver reports tell the link's loss (pure, no media)."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from media_server.adaptation import LadderPool, SubscriberAdaptation
from media_server.downtrack import DownTrack
from media_server.hooks import ReceiverReport
from media_server.subscriber import Slot

BPS = 400_000  # per stream


async def _delivering(kinds: tuple[str, ...]) -> tuple[SubscriberAdaptation, list[Slot]]:
    """A subscriber sent BPS on each stream for the last 8 s."""
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    slots = [Slot(kind, DownTrack(kind, "t"), cast(Any, None)) for kind in kinds]
    now = time.monotonic()
    t = now - 8.0
    while t <= now:
        for slot in slots:
            slot.downtrack.wire_bytes_forwarded += BPS // 8 // 2
        await adaptation.tick(slots, now=t)
        t += 0.5
    return adaptation, slots


def _block(fraction_lost: float, highest: int) -> ReceiverReport:
    return ReceiverReport(fraction_lost, 0, 0, highest, rtt_s=0.7, rtt_sample_s=0.7)


async def test_a_repeated_video_hides_the_loss_so_the_cut_follows_the_audio() -> None:
    """EDGE after satellite: the link loses 80 %, the video's receiver keeps either copy."""
    adaptation, (audio, video) = await _delivering(("audio", "video"))
    adaptation._repeat(video, 2)
    on_audio, on_video = (adaptation.feedback(s.downtrack).on_report for s in (audio, video))
    on_audio(_block(0.0, 100))  # origins
    on_video(_block(0.0, 100))
    now = time.monotonic()
    delivered = adaptation.estimator.delivered_bps(now)
    assert delivered is not None and delivered > 1.5 * BPS
    on_video(_block(0.0, 150))  # both copies of a packet lost: 0.8 x 0.8, yet more arrive
    on_audio(_block(0.8, 150))
    # one cut, to what got through: not 1 - 0.5 x 0.4 of the pooled 40 %
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= 0.21 * delivered
    assert adaptation.estimator.snapshot(time.monotonic()).last_cut == "loss 0.80"


async def test_without_a_stream_sent_once_a_repeated_streams_loss_still_counts() -> None:
    """A viewer of a silent camera has nothing else to judge the link by."""
    adaptation, (video,) = await _delivering(("video",))
    adaptation._repeat(video, 2)
    on_video = adaptation.feedback(video.downtrack).on_report
    on_video(_block(0.0, 100))
    delivered = adaptation.estimator.delivered_bps(time.monotonic())
    assert delivered is not None
    on_video(_block(0.6, 200))
    assert adaptation.estimator.estimate_bps(time.monotonic()) <= 0.41 * delivered


async def test_a_clean_repeated_video_does_not_dilute_the_audios_heavy_loss() -> None:
    """The link's loss is judged over the streams sent once, however many packets video had."""
    adaptation, (audio, video) = await _delivering(("audio", "video"))
    adaptation._repeat(video, 2)
    on_audio, on_video = (adaptation.feedback(s.downtrack).on_report for s in (audio, video))
    on_audio(_block(0.0, 100))
    on_video(_block(0.0, 100))
    before = adaptation.estimator.estimate_bps(time.monotonic())
    on_video(_block(0.0, 130))  # 30 packets, none missing: pooled with the next, once
    on_audio(_block(10 / 30, 130))  # 30 packets, 10 lost
    assert adaptation.estimator.estimate_bps(time.monotonic()) < before
    assert adaptation.estimator.judged_loss == pytest.approx(10 / 30)
