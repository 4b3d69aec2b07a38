"""SubscriberAdaptation: a video resumed after a pause brings no false congestion signal.

Its receiver's first report counts, as lost now, what a congested link dropped
before the pause; its receiver's first REMBs start again from what it got so far.
"""

from __future__ import annotations

import time
from typing import Any, cast

from media_server.adaptation import LadderPool, SubscriberAdaptation
from media_server.allocator import ORIGINAL, PAUSED, Choice
from media_server.downtrack import DownTrack
from media_server.forwarder import TrackInfo
from media_server.hooks import ReceiverReport, SenderFeedback
from media_server.subscriber import Slot
from tests.fakes import FakeSource

VIDEO_BPS = 400_000


def _report(highest: int, lost: float = 0.0) -> ReceiverReport:
    return ReceiverReport(fraction_lost=lost, packets_lost=0, jitter=0, highest_sequence=highest)


def report(feedback: SenderFeedback, rr: ReceiverReport) -> None:
    assert feedback.on_report is not None
    feedback.on_report(rr)


def remb(feedback: SenderFeedback, bps: int, ssrcs: list[int]) -> None:
    assert feedback.on_remb is not None
    feedback.on_remb(bps, ssrcs)


async def _tick(adaptation: SubscriberAdaptation, slot: Slot, t: float, sending: bool) -> None:
    if sending:
        slot.downtrack.wire_bytes_forwarded += VIDEO_BPS // 8 // 2
    await adaptation.tick([slot], now=t)


async def test_the_first_report_after_a_pause_is_an_origin_not_a_loss() -> None:
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    slot = Slot("video", DownTrack("video", "t"), cast(Any, None))
    feedback = adaptation.feedback(slot.downtrack)
    now = time.monotonic()
    t = now - 10
    while t < now - 5:  # sending, clean
        await _tick(adaptation, slot, t, True)
        t += 0.5
    report(feedback, _report(1000))
    report(feedback, _report(1100))
    while t < now:  # paused: nothing sent for 5 s (meanwhile the link dropped 180 packets)
        await _tick(adaptation, slot, t, False)
        t += 0.5
    report(feedback, _report(1100))
    before = adaptation.estimator.estimate_bps(time.monotonic())
    await _tick(adaptation, slot, time.monotonic(), True)  # resumed
    # the receiver counts the packets lost before the pause in its first report
    report(feedback, _report(1300, lost=0.9))
    assert adaptation.estimator.estimate_bps(time.monotonic()) == before
    # later reports count again
    report(feedback, _report(1400, lost=0.5))
    assert adaptation.estimator.estimate_bps(time.monotonic()) < before


async def test_a_stream_that_keeps_sending_reports_its_losses_at_once() -> None:
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    slot = Slot("video", DownTrack("video", "t"), cast(Any, None))
    feedback = adaptation.feedback(slot.downtrack)
    now = time.monotonic()
    t = now - 5
    while t < now:
        await _tick(adaptation, slot, t, True)
        t += 0.5
    report(feedback, _report(1000))
    before = adaptation.estimator.estimate_bps(time.monotonic())
    report(feedback, _report(1200, lost=0.9))
    assert adaptation.estimator.estimate_bps(time.monotonic()) < before


async def test_remb_of_a_resumed_video_is_ignored_while_its_receiver_warms_up() -> None:
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    slot = Slot("video", DownTrack("video", "t"), cast(Any, None))
    feedback = adaptation.feedback(slot.downtrack)
    now = time.monotonic()
    t = now - 10
    while t < now:
        await _tick(adaptation, slot, t, True)
        t += 0.5
    slot.info = TrackInfo("p:camera", "p", "video", "camera")
    slot.forwarder = cast(Any, FakeSource("p"))
    adaptation.layers["p:camera"] = PAUSED
    await adaptation._apply(slot, Choice(ORIGINAL, "ok", VIDEO_BPS))  # resumes
    before = adaptation.estimator.estimate_bps(time.monotonic())
    remb(feedback, VIDEO_BPS, [1])
    remb(feedback, VIDEO_BPS // 4, [1])  # far below what is delivered, and falling
    assert adaptation.estimator.estimate_bps(time.monotonic()) == before
