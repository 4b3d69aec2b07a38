"""Audio mode: when a viewer gets one mix instead of the originals, and how it is applied."""

from __future__ import annotations

from typing import Any

import pytest

from media_server.allocator import AUDIO_MIX, AUDIO_ORIGINALS, AudioRule, AudioRuleConfig
from media_server.audiomix import AudioMixer
from media_server.audiomode import MIX_LAYERS, AudioMode, MixSource
from media_server.downtrack import DownTrack
from media_server.forwarder import TrackInfo
from media_server.subscriber import Slot
from tests.fakes import FakeSource

ORIGINAL_BPS = 56_000
FIVE = [ORIGINAL_BPS] * 5  # 280 kbit/s of audio originals
BEST, SECOND, THIRD, CHEAPEST = MIX_LAYERS


def _option(rule: AudioRule, estimate: float, loss: float | None = None) -> tuple[str, str, int]:
    plan = rule.decide(estimate, FIVE, MIX_LAYERS, loss)
    return plan.mode, plan.layer.name if plan.layer else "", plan.copies


# -- the rule ---------------------------------------------------------------------


def test_one_audio_track_is_never_mixed() -> None:
    rule = AudioRule()
    plan = rule.decide(20_000, [ORIGINAL_BPS], MIX_LAYERS)
    assert plan.mode == AUDIO_ORIGINALS and plan.reserve_bps == ORIGINAL_BPS


def test_originals_taking_over_40_percent_go_to_the_mix_at_once() -> None:
    assert AudioRule().decide(800_000, FIVE, MIX_LAYERS).mode == AUDIO_ORIGINALS  # 35 %
    plan = AudioRule().decide(600_000, FIVE, MIX_LAYERS)  # 47 %
    assert plan.mode == AUDIO_MIX
    # the best format that fits 30 % of the estimate; its wire rate is reserved
    assert plan.layer == BEST and plan.copies == 1 and plan.reserve_bps == BEST.bitrate


def test_back_to_the_originals_only_when_they_fit_comfortably_for_a_while() -> None:
    rule = AudioRule()
    assert rule.decide(500_000, FIVE, MIX_LAYERS).mixing
    # 35 %: below the entry threshold but not comfortable: stays on the mix
    for _ in range(20):
        assert rule.decide(800_000, FIVE, MIX_LAYERS).mixing
    # 23 %: six calls in a row
    for _ in range(5):
        assert rule.decide(1_200_000, FIVE, MIX_LAYERS).mixing
    plan = rule.decide(1_200_000, FIVE, MIX_LAYERS)
    assert plan.mode == AUDIO_ORIGINALS and plan.reserve_bps == sum(FIVE)


def test_a_quick_return_to_the_mix_doubles_the_wait_before_leaving_again() -> None:
    rule = AudioRule()
    rule.decide(500_000, FIVE, MIX_LAYERS)
    for _ in range(6):
        rule.decide(1_200_000, FIVE, MIX_LAYERS)
    assert not rule.mixing
    assert rule.decide(500_000, FIVE, MIX_LAYERS).mixing  # a failed return
    calls = 0
    while rule.decide(1_200_000, FIVE, MIX_LAYERS).mixing:
        calls += 1
    assert calls == 11  # 12 calls instead of 6


def test_edge_gets_the_cheapest_format_even_when_nothing_fits() -> None:
    rule = AudioRule()
    plan = rule.decide(50_000, FIVE, MIX_LAYERS, loss=0.03)
    assert plan.mixing and plan.layer == CHEAPEST and plan.copies == 1
    assert plan.reserve_bps == CHEAPEST.bitrate
    # what the carrier measurably sends counts if it is more
    plan = rule.decide(50_000, FIVE, MIX_LAYERS, 0.03, measured_mix_bps=30_000)
    assert plan.reserve_bps == 30_000


def test_a_lossy_link_gets_each_packet_twice_before_a_better_format() -> None:
    # two copies may take 50 % of the estimate, one copy 30 %
    assert _option(AudioRule(), 300_000) == (AUDIO_MIX, BEST.name, 1)
    assert _option(AudioRule(), 300_000, loss=0.02) == (AUDIO_MIX, BEST.name, 2)  # 90.4 kbit/s
    assert _option(AudioRule(), 160_000, loss=0.02) == (AUDIO_MIX, SECOND.name, 2)  # 74.4
    assert _option(AudioRule(), 90_000, loss=0.02) == (AUDIO_MIX, CHEAPEST.name, 2)  # 41.6
    assert _option(AudioRule(), 60_000, loss=0.02) == (AUDIO_MIX, CHEAPEST.name, 1)
    rule = AudioRule()
    assert _option(rule, 300_000, loss=0.02)[2] == 2
    assert _option(rule, 300_000, loss=0.006)[2] == 2  # hysteresis: still lossy
    assert _option(rule, 300_000, loss=0.002)[2] == 1


def test_while_video_is_repeated_too_two_copies_take_a_leaner_share() -> None:
    def lean(estimate: float) -> tuple[str, int]:
        plan = AudioRule().decide(estimate, FIVE, MIX_LAYERS, 0.02, video_repeated=True)
        return (plan.layer.name if plan.layer else ""), plan.copies

    assert lean(240_000) == (SECOND.name, 2)  # 74.4 <= 35 %, where 50 % allowed 90.4
    assert lean(160_000) == (THIRD.name, 2)  # 49.6 kbit/s: room for the picture's copies
    # the leaner share has no second copy to offer: audio keeps its own
    assert lean(90_000) == (CHEAPEST.name, 2)


def test_format_goes_down_at_once_and_up_after_a_streak() -> None:
    rule = AudioRule()
    assert _option(rule, 300_000)[1] == BEST.name
    assert _option(rule, 160_000)[1] == BEST.name  # 45.2 <= 48 / 0.85: dead band
    assert _option(rule, 120_000)[1] == THIRD.name  # 36 kbit/s: 24k/40ms (37.2) does not fit
    for _ in range(9):
        assert _option(rule, 300_000)[1] == THIRD.name
    assert _option(rule, 300_000)[1] == BEST.name


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        AudioRuleConfig(enter_share=0.2, leave_share=0.3)


# -- applying it to the slots -------------------------------------------------------


class _Transceiver:
    def __init__(self, mid: str | None) -> None:
        self.mid = mid


def _slot(kind: str, participant: str, mid: str | None) -> Slot:
    info = TrackInfo(f"{participant}:{kind}", participant, kind, "microphone")
    return Slot(kind, DownTrack(kind, mid or "?"), _Transceiver(mid), info, FakeSource(participant))  # type: ignore[arg-type]


def _bound_to(slot: Slot) -> Any:
    return slot.downtrack.source


async def test_mix_on_one_transceiver_others_carry_nothing_and_back() -> None:
    mixer = AudioMixer("t", threaded=False)
    told: list[dict[str, Any]] = []

    async def tell(state: dict[str, Any]) -> None:
        told.append(state)

    mode = AudioMode("me", mixer, tell)
    slots = [_slot("audio", p, m) for p, m in (("a", "1"), ("b", "3"), ("c", "5"))]
    own = _slot("audio", "me", "7")  # never happens in a room; must not be mixed anyway
    video = _slot("video", "a", "0")
    everything = [video, *slots, own]
    for slot in everything:
        assert slot.forwarder is not None
        slot.downtrack.bind(slot.forwarder)
    plan = AudioRule().decide(100_000, [ORIGINAL_BPS] * 3, MIX_LAYERS)
    await mode.apply(plan, everything)
    carrier = slots[0]
    assert isinstance(_bound_to(carrier), MixSource)
    assert _bound_to(slots[1]) is None and _bound_to(slots[2]) is None
    assert _bound_to(video) is video.forwarder  # video is not audio mode's business
    assert mixer.input_ids() == {"a:audio", "b:audio", "c:audio"}  # not "me"
    assert told[-1]["mode"] == AUDIO_MIX and told[-1]["mid"] == "1"
    assert {t["participant_id"] for t in told[-1]["tracks"]} == {"a", "b", "c"}
    assert mode.state == told[-1]

    # same plan: nothing changes, nobody is told
    await mode.apply(plan, everything)
    assert len(told) == 1

    # a publisher reconnects: same track id, a new Forwarder: the mix follows it
    old = slots[2].forwarder
    assert isinstance(old, FakeSource) and old.sinks
    slots[2].forwarder = FakeSource("c2")
    await mode.apply(plan, everything)
    assert not old.sinks and slots[2].forwarder.sinks
    assert mixer.input_ids() == {"a:audio", "b:audio", "c:audio"}

    # the carrier's track goes away: the mix moves to another transceiver at once
    carrier.info, carrier.forwarder = None, None
    carrier.downtrack.unbind()
    mode.track_removed(everything)
    assert mode.carrier is slots[1] and isinstance(_bound_to(slots[1]), MixSource)
    await mode.apply(plan, everything)  # rebuilt without the departed input
    assert mixer.input_ids() == {"b:audio", "c:audio"}
    assert told[-1]["mid"] == "3"

    # back to the originals: each transceiver carries its own track again
    await mode.apply(AudioRule().decide(20_000_000, [ORIGINAL_BPS] * 2, MIX_LAYERS), everything)
    assert _bound_to(slots[1]) is slots[1].forwarder and _bound_to(slots[2]) is slots[2].forwarder
    assert not mixer.active and told[-1]["mode"] == AUDIO_ORIGINALS
    mode.close()
    mixer.close()
