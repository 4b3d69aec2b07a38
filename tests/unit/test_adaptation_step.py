"""SubscriberAdaptation: a step up that overfilled a lossy long-RTT link holds the rise."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from media_server.adaptation import LadderPool, SubscriberAdaptation
from media_server.downtrack import DownTrack
from media_server.hooks import SenderFeedback
from media_server.subscriber import Slot
from tests.unit.test_adaptation_resume import VIDEO_BPS, _report, _tick, report


async def _satellite_viewer() -> tuple[SubscriberAdaptation, Slot, SenderFeedback, float]:
    """A viewer on a lossy long-RTT link, video flowing for 4 s: (..., the time now)."""
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    slot = Slot("video", DownTrack("video", "t"), cast(Any, None))
    feedback = adaptation.feedback(slot.downtrack)
    adaptation.video_repeat.decide(0.02, 0.6, 1_000_000, 50_000)
    assert adaptation.video_repeat.link_needs
    now = time.monotonic()
    t = now - 5
    while t < now - 1:
        await _tick(adaptation, slot, t, True)
        t += 0.5
    report(feedback, _report(1000, lost=0.02))
    return adaptation, slot, feedback, t


async def test_a_step_up_cut_within_its_blame_window_holds_the_rise_limit() -> None:
    """On a lossy long-RTT link, a cut soon after the videos got dearer holds the
    estimate's rise near what was delivered before (stepmemory.py)."""
    adaptation, slot, feedback, t = await _satellite_viewer()
    free = adaptation.estimator.rise_limit_bps
    assert free is not None and free > 1.4 * VIDEO_BPS  # 1.5x delivered + 10 kbit/s
    delivered = adaptation.estimator.delivered_bps(t)
    assert delivered is not None
    adaptation._remember_step(VIDEO_BPS // 2, t)  # what was allocated
    adaptation._remember_step(VIDEO_BPS, t)  # the allocation just got dearer
    report(feedback, _report(1200, lost=0.5))  # the queue overflowed: a loss cut
    await _tick(adaptation, slot, t + 0.5, True)  # the cut is seen
    await _tick(adaptation, slot, t + 1.0, True)  # and the limit set
    held = adaptation.estimator.rise_limit_bps
    assert held == pytest.approx(1.1 * delivered + 10_000)
    assert adaptation.step_memory.failed_steps == 1


async def test_a_resume_from_all_paused_is_no_step() -> None:
    """The lowest rung resumed is the probe a paused viewer needs: its cut holds nothing."""
    adaptation, slot, feedback, t = await _satellite_viewer()
    adaptation._remember_step(VIDEO_BPS, t)  # from nothing allocated
    report(feedback, _report(1200, lost=0.5))
    await _tick(adaptation, slot, t + 0.5, True)
    assert adaptation.step_memory.failed_steps == 0
