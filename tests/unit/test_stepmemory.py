"""StepMemory: a step up that overfilled a lossy long-RTT link is not retried at once."""

from __future__ import annotations

import pytest

from media_server.stepmemory import StepMemory, StepMemoryConfig


def test_a_cut_soon_after_a_step_holds_the_rise_near_what_went_before() -> None:
    m = StepMemory(StepMemoryConfig(blame_s=3.0, hold_s=40.0, factor=1.1, add_bps=10_000))
    assert m.limit_bps(0.0) is None
    m.stepped_up(287_000, 10.0)  # 144p twice -> 180p twice
    m.cut(11.5)  # the REMB collapsed
    assert m.limit_bps(12.0) == pytest.approx(1.1 * 287_000 + 10_000)
    assert m.limit_bps(49.9) is not None
    assert m.limit_bps(50.1) is None  # 40 s after the step
    assert m.failed_steps == 1


def test_a_cut_long_after_the_step_is_not_the_steps() -> None:
    m = StepMemory()
    m.stepped_up(287_000, 10.0)
    m.cut(13.5)  # random loss, after the 3 s blame window
    assert m.limit_bps(14.0) is None
    m.cut(14.0)  # and a cut with no step at all
    assert m.limit_bps(14.5) is None and m.failed_steps == 0


def test_failures_in_a_row_double_the_hold_and_a_free_success_ends_the_series() -> None:
    m = StepMemory(StepMemoryConfig(hold_s=40.0, max_hold_s=100.0))
    m.stepped_up(250_000, 0.0)
    m.cut(1.0)  # held until 40 s
    m.stepped_up(250_000, 20.0)  # a step within the limit, under the hold: proves nothing
    assert m.limit_bps(30.0) is not None
    m.stepped_up(280_000, 41.0)  # the next probe, after the hold
    m.cut(42.0)
    assert m.limit_bps(41.0 + 79.0) is not None  # 80 s this time
    assert m.limit_bps(41.0 + 81.0) is None
    m.stepped_up(280_000, 130.0)
    m.cut(131.0)
    assert m.limit_bps(130.0 + 99.0) is not None  # 160 s, capped at 100
    assert m.limit_bps(130.0 + 101.0) is None
    m.stepped_up(300_000, 240.0)  # survives its blame window
    assert m.limit_bps(244.0) is None
    m.stepped_up(400_000, 250.0)
    m.cut(251.0)
    assert m.limit_bps(250.0 + 39.0) is not None and m.limit_bps(250.0 + 41.0) is None


def test_the_delivered_rate_before_the_first_of_two_quick_steps_is_kept() -> None:
    m = StepMemory()
    m.stepped_up(200_000, 10.0)
    m.stepped_up(290_000, 10.5)
    m.cut(12.0)
    assert m.limit_bps(12.0) == pytest.approx(1.1 * 200_000 + 10_000)


def test_a_new_path_forgets_the_failure() -> None:
    m = StepMemory()
    m.stepped_up(287_000, 10.0)
    m.cut(11.0)
    m.forget()
    assert m.limit_bps(12.0) is None


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        StepMemoryConfig(hold_s=0.0)
    with pytest.raises(ValueError):
        StepMemoryConfig(factor=0.9)
