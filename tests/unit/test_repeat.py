"""VideoRepeat: rungs go twice on a lossy link with a long round trip, if the budget allows."""

from __future__ import annotations

import pytest

from media_server.repeat import RepeatConfig, VideoRepeat

RUNG = 45_000  # the cheapest rung, one copy on the wire


def test_a_satellite_link_with_room_for_two_copies_gets_them() -> None:
    rule = VideoRepeat()
    assert rule.decide(0.02, 0.6, 2.4 * RUNG, RUNG) == 2
    assert rule.link_needs


@pytest.mark.parametrize(
    ("loss", "rtt"),
    [(0.02, 0.15), (0.005, 0.6), (None, 0.6), (0.02, None)],
    ids=["3g round trip", "clean", "loss unknown", "rtt unknown"],
)
def test_short_round_trips_clean_links_and_no_evidence_send_once(
    loss: float | None, rtt: float | None
) -> None:
    assert VideoRepeat().decide(loss, rtt, 10 * RUNG, RUNG) == 1


def test_a_queue_on_a_short_path_is_not_a_long_round_trip() -> None:
    """3G (150 ms) with its 400 ms queue standing: the 3 s floor reads up to 0.5 s."""
    rule = VideoRepeat()
    for floor in (0.35, 0.45, 0.5):
        assert rule.decide(0.05, floor, 10 * RUNG, RUNG) == 1
    assert not rule.link_needs
    assert rule.decide(0.05, 0.57, 10 * RUNG, RUNG) == 2  # a geostationary hop


def test_without_room_for_two_copies_the_picture_goes_once() -> None:
    rule = VideoRepeat()
    assert rule.decide(0.02, 0.6, 1.5 * RUNG, RUNG) == 1
    assert rule.link_needs  # it would pay: the audio rule leaves room next time
    assert rule.decide(0.02, 0.6, 2 * RUNG, RUNG) == 1  # two copies and nothing to spare
    assert rule.decide(0.02, 0.6, 1.15 * 2 * RUNG, RUNG) == 2
    # a dip that still covers both copies keeps them
    assert rule.decide(0.02, 0.6, 2 * RUNG, RUNG) == 2


def test_two_copies_stop_as_soon_as_they_no_longer_fit() -> None:
    """A video coming down from a higher rung finds no rung whose two copies fit:
    with copies on it would pause, while one copy of the cheapest rung fits."""
    rule = VideoRepeat()
    assert rule.decide(0.02, 0.6, 4 * RUNG, RUNG) == 2
    assert rule.decide(0.02, 0.6, 0.95 * 2 * RUNG, RUNG) == 1
    assert rule.decide(0.02, 0.6, 2.2 * RUNG, RUNG) == 1  # not back within the band


def test_hysteresis_on_loss_and_round_trip() -> None:
    rule = VideoRepeat()
    assert rule.decide(0.02, 0.6, 4 * RUNG, RUNG) == 2
    assert rule.decide(0.006, 0.25, 4 * RUNG, RUNG) == 2  # between the thresholds: kept
    assert rule.decide(None, None, 4 * RUNG, RUNG) == 2  # no news: kept
    assert rule.decide(0.003, 0.6, 4 * RUNG, RUNG) == 1  # clean now
    assert rule.decide(0.006, 0.6, 4 * RUNG, RUNG) == 1  # not lossy enough to come back
    assert rule.decide(0.02, 0.6, 4 * RUNG, RUNG) == 2
    assert rule.decide(0.02, 0.1, 4 * RUNG, RUNG) == 1  # the round trip got short
    assert rule.changes == 4


def test_no_rungs_no_copies() -> None:
    assert VideoRepeat().decide(0.05, 0.8, 1_000_000, None) == 1


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        RepeatConfig(on_loss=0.001, off_loss=0.01)
    with pytest.raises(ValueError):
        RepeatConfig(copies=1)
    with pytest.raises(ValueError):
        RepeatConfig(on_rtt_s=0.2, off_rtt_s=0.3)
    with pytest.raises(ValueError):
        RepeatConfig(on_budget_share=0.9)
