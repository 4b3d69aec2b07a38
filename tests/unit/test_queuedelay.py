"""QueueDelay: a REMB fall is believed when round trips grew above their floor."""

from __future__ import annotations

import pytest

from media_server.queuedelay import QueueDelay


def test_without_enough_samples_it_has_no_opinion() -> None:
    q = QueueDelay(min_samples=3)
    assert q.confirms(0.0)
    q.add(0.6, 0.0)
    q.add(0.61, 0.5)
    assert q.queued_s(0.5) is None
    assert q.confirms(0.5)


def test_jitter_is_not_a_queue_but_a_grown_round_trip_is() -> None:
    q = QueueDelay(threshold_s=0.08, threshold_share=0.15)
    for i, rtt in enumerate([0.60, 0.63, 0.58, 0.62, 0.61, 0.64]):  # satellite, +-30 ms
        q.add(rtt, i * 0.5)
    assert q.base_s(3.0) == pytest.approx(0.58)
    assert not q.confirms(3.0)
    q.add(0.58 + 0.3, 3.0)  # one sample alone: maybe an event loop that was late
    assert not q.confirms(3.0)
    q.add(0.58 + 0.2, 3.5)  # a second one: 200 ms of queue
    assert q.queued_s(3.5) == pytest.approx(0.2)
    assert q.confirms(3.5)


def test_the_threshold_grows_with_the_base_round_trip() -> None:
    q = QueueDelay(threshold_s=0.05, threshold_share=0.15)
    for i in range(3):
        q.add(1.0, i)
    q.add(1.1, 3)  # 100 ms on a 1 s round trip: under 15 %
    q.add(1.1, 3.5)
    assert not q.confirms(3.5)
    q.add(1.2, 4)
    q.add(1.2, 4.5)
    assert q.confirms(4.5)


def test_old_samples_leave_the_window() -> None:
    q = QueueDelay(window_s=10.0)
    for i in range(3):
        q.add(0.01, i)  # a LAN, long ago
    for i in range(3):
        q.add(0.6, 20 + i)  # now a satellite link: its own floor
    assert q.base_s(22) == pytest.approx(0.6)
    assert not q.confirms(22)


def test_one_queue_confirms_one_fall_unless_it_grows() -> None:
    q = QueueDelay(threshold_s=0.08, threshold_share=0.15)
    for i in range(6):
        q.add(0.6, i * 0.5)
    q.add(0.9, 2.8)
    q.add(0.9, 3.0)  # 300 ms of queue
    assert q.confirms(3.0)
    q.followed(3.0)
    q.add(0.92, 3.5)  # the same queue: the receiver's detector fires on
    assert not q.confirms(3.5)
    q.add(1.1, 3.8)
    q.add(1.1, 4.0)  # it grew by more than the threshold: news
    assert q.confirms(4.0)
    q.followed(4.0)
    q.add(0.62, 4.5)  # drained: the episode ends
    q.add(0.8, 4.8)
    q.add(0.8, 5.0)  # a new, smaller queue confirms again
    assert q.confirms(5.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        QueueDelay(window_s=0)
    with pytest.raises(ValueError):
        QueueDelay(window_s=2.0, settle_s=2.0)
    q = QueueDelay()
    q.add(-1.0, 0.0)  # ignored
    assert q.base_s(0.0) is None


def test_the_recent_floor_follows_a_change_of_link_at_once() -> None:
    q = QueueDelay(window_s=15.0, settle_s=2.0)
    for i in range(10):
        q.add(0.15, i * 0.5)  # 3G
    q.add(0.6, 5.0)  # satellite from t = 5 s
    q.add(0.61, 5.5)
    assert q.recent_floor_s(5.5, span_s=0.9) == pytest.approx(0.6)
    assert q.base_s(5.5) == pytest.approx(0.15)  # one second of a new level: maybe a queue
    assert q.confirms(5.5)
    assert q.recent_floor_s(30.0) is None


def test_a_round_trip_that_moves_up_and_stays_is_a_new_link_not_a_queue() -> None:
    """3G (150 ms) to satellite (600 ms +- 30): after 2 s flat at the new level the old
    link is forgotten, and a REMB fall no longer reads the step as a queue."""
    q = QueueDelay(window_s=8.0, settle_s=2.0)
    for i in range(16):
        q.add(0.15 + 0.01 * (i % 3), i * 0.5)  # 3G
    for i, rtt in enumerate([0.60, 0.63, 0.58, 0.62, 0.61, 0.59, 0.62]):
        q.add(rtt, 8.0 + i * 0.5)  # satellite from t = 8 s
    assert q.new_links >= 1
    assert q.base_s(11.0) == pytest.approx(0.58, abs=0.02)
    assert not q.confirms(11.0)
    q.add(0.80, 11.3)  # then a real queue on the new link
    q.add(0.80, 11.5)
    assert q.confirms(11.5)


def test_a_growing_queue_is_not_a_new_link() -> None:
    q = QueueDelay(window_s=8.0, settle_s=2.0)
    for i in range(12):
        q.add(0.6, i * 0.5)  # satellite
    for i in range(8):
        q.add(0.7 + 0.06 * i, 6.0 + i * 0.5)  # a queue building 120 ms a second
    assert q.new_links == 0
    assert q.base_s(9.5) == pytest.approx(0.6)
    assert q.confirms(9.5)


def test_a_full_queue_is_flat_but_lossy_and_not_a_new_link() -> None:
    q = QueueDelay(window_s=8.0, settle_s=2.0)
    for i in range(8):
        q.add(0.15, i * 0.5)  # 3G
    for i in range(6):
        q.heavy_loss(4.0 + i * 0.5)  # its 400 ms queue full, overflowing
        q.add(0.55, 4.0 + i * 0.5)
    assert q.new_links == 0
    assert q.confirms(6.5)


def test_a_queue_that_drains_keeps_the_link_floor() -> None:
    q = QueueDelay(window_s=8.0, settle_s=2.0)
    for i in range(8):
        q.add(0.6, i * 0.5)
    for i, rtt in enumerate([0.9, 1.1, 0.8, 0.65, 0.61]):  # built, then cut and drained
        q.add(rtt, 4.0 + i * 0.5)
    assert q.new_links == 0
    assert q.base_s(6.0) == pytest.approx(0.6)


def test_no_recent_sample_is_no_opinion() -> None:
    """No sample for a while (reports stopped): no opinion, follow the REMB."""
    q = QueueDelay(stale_s=2.0)
    for i in range(4):
        q.add(0.6, i * 0.5)
    assert not q.confirms(2.0)
    assert q.confirms(4.0)


def test_two_samples_far_below_the_floor_are_a_shorter_path() -> None:
    """EDGE's 750 ms to a LAN's 2 ms: a round trip cannot fall below its path's delay."""
    q = QueueDelay()
    for i in range(6):
        q.add(0.75 + 0.01 * (i % 2), 0.5 * i)
    q.add(0.05, 3.0)  # one sample alone is not enough
    assert q.faster_links == 0
    q.add(0.002, 3.5)
    assert q.faster_links == 1
    q.add(0.002, 4.0)  # the new floor: nothing more
    assert q.faster_links == 1
    assert q.base_s(4.0) == 0.002


def test_a_draining_queue_or_a_small_fall_is_not_a_shorter_path() -> None:
    q = QueueDelay()
    for i, rtt in enumerate([0.6, 0.6, 0.6, 1.2, 1.1, 0.6, 0.6]):  # a queue built and drained
        q.add(rtt, 0.5 * i)
    q2 = QueueDelay()
    for i, rtt in enumerate([0.3, 0.3, 0.3, 0.14, 0.14]):  # half, but by only 160 ms
        q2.add(rtt, 0.5 * i)
    assert q.faster_links == 0 and q2.faster_links == 0
