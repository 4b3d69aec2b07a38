"""A fall of the estimate is acted on at once, not at the room's next adaptation step."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from aiortc import RTCConfiguration, VideoStreamTrack

from media_server import hooks
from media_server.adaptation import LadderPool, SubscriberAdaptation
from media_server.allocator import ORIGINAL
from media_server.downtrack import DownTrack
from media_server.forwarder import Forwarder, TrackInfo
from media_server.subscriber import Slot, SubscriberConnection
from tests.unit.test_adaptation_remb import VIDEO_BPS, adaptation_delivering


def _report(lost: float, highest: int) -> hooks.ReceiverReport:
    return hooks.ReceiverReport(lost, 0, 0, highest, rtt_s=0.2, rtt_sample_s=0.2)


async def test_a_loss_cut_tells_the_owner_and_a_clean_report_does_not() -> None:
    adaptation, downtrack = await adaptation_delivering(4.0)
    falls: list[int] = []
    adaptation.on_fall = lambda: falls.append(adaptation.estimator.estimate_bps(time.monotonic()))
    feedback = adaptation.feedback(downtrack)
    feedback.on_report(_report(0.0, 100))  # the stream's origin
    feedback.on_report(_report(0.0, 200))
    assert falls == []
    feedback.on_report(_report(0.4, 300))  # a queue overflowed: 40 % of 100 packets lost
    assert len(falls) == 1
    assert falls[0] < VIDEO_BPS


async def test_a_remb_fall_that_is_followed_tells_the_owner() -> None:
    adaptation, downtrack = await adaptation_delivering(8.0)
    falls: list[None] = []
    adaptation.on_fall = lambda: falls.append(None)
    feedback = adaptation.feedback(downtrack)
    feedback.on_remb(int(VIDEO_BPS * 0.95), [1234])
    assert falls == []  # not a fall: a receiver a little below what it is sent
    feedback.on_remb(int(VIDEO_BPS * 0.2), [1234])  # far below what is sent: a link drop
    assert falls == [None]


async def test_a_fall_runs_one_adaptation_step_at_once() -> None:
    connection = SubscriberConnection("t", RTCConfiguration(), cast(Any, None), LadderPool())
    adaptation = connection.adaptation
    assert adaptation is not None and adaptation.on_fall is not None
    ticks: list[str | None] = []

    async def tick(slots: list[Slot], now: float | None = None, speaker: str | None = None) -> None:
        ticks.append(speaker)
        await asyncio.sleep(0.01)

    async def react(slots: list[Slot], speaker: str | None = None) -> None:
        ticks.append(f"fall, {speaker}")
        await asyncio.sleep(0.01)

    adaptation.tick = tick  # type: ignore[method-assign]
    adaptation.react = react  # type: ignore[method-assign]
    await connection.adapt("speaker")  # the room's periodic step
    adaptation.on_fall()
    adaptation.on_fall()  # a second cut from the same RTCP packet shares the step
    await asyncio.sleep(0.05)
    assert ticks == ["speaker", "fall, speaker"]
    adaptation.on_fall()
    await connection.close()  # a step pending at close is dropped, not run
    await asyncio.sleep(0.05)
    assert len(ticks) == 2


async def test_a_step_after_a_fall_decides_on_what_the_periodic_step_measured() -> None:
    """Rates over the milliseconds since the last step are noise, not a measurement."""
    adaptation = SubscriberAdaptation("t", LadderPool(), None)
    info = TrackInfo("pub:camera", "pub", "video", "camera")
    forwarder = Forwarder(info, VideoStreamTrack(), None)
    slot = Slot("video", DownTrack("video", "t"), cast(Any, None), info, forwarder)
    t = time.monotonic() - 1.0
    for step in range(3):  # 400 kbit/s, measured every 0.5 s
        forwarder.wire_bytes += VIDEO_BPS // 8 // 2
        slot.downtrack.wire_bytes_forwarded += VIDEO_BPS // 8 // 2
        await adaptation.tick([slot], now=t + 0.5 * step)
    measured = adaptation._original_bps[info.id]
    later = time.monotonic() + 0.2
    delivered = adaptation.estimator.delivered_bps(later)
    forwarder.wire_bytes += 50_000  # a keyframe, a few milliseconds after the step
    slot.downtrack.wire_bytes_forwarded += 50_000
    await adaptation.react([slot])
    assert adaptation._original_bps[info.id] == measured
    assert adaptation.estimator.delivered_bps(later) == delivered
    assert adaptation.layers.get(info.id, ORIGINAL) == ORIGINAL  # decided: nothing to cut
