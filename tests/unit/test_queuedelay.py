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
    q.add(0.58 + 0.2, 3.0)  # 200 ms of queue
    assert q.queued_s(3.0) == pytest.approx(0.2)
    assert q.confirms(3.0)


def test_the_threshold_grows_with_the_base_round_trip() -> None:
    q = QueueDelay(threshold_s=0.05, threshold_share=0.15)
    for i in range(3):
        q.add(1.0, i)
    q.add(1.1, 3)  # 100 ms on a 1 s round trip: under 15 %
    assert not q.confirms(3)
    q.add(1.2, 4)
    assert q.confirms(4)


def test_old_samples_leave_the_window() -> None:
    q = QueueDelay(window_s=10.0)
    for i in range(3):
        q.add(0.01, i)  # a LAN, long ago
    for i in range(3):
        q.add(0.6, 20 + i)  # now a satellite link: its own floor
    assert q.base_s(22) == pytest.approx(0.6)
    assert not q.confirms(22)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        QueueDelay(window_s=0)
    q = QueueDelay()
    q.add(-1.0, 0.0)  # ignored
    assert q.base_s(0.0) is None


def test_the_recent_floor_follows_a_change_of_link_at_once() -> None:
    q = QueueDelay(window_s=15.0)
    for i in range(10):
        q.add(0.15, i * 0.5)  # 3G
    for i in range(6):
        q.add(0.6 + 0.01 * i, 5.0 + i * 0.5)  # satellite from t = 5 s
    assert q.base_s(8.0) == pytest.approx(0.15)  # the queue's floor remembers 3G
    assert q.recent_floor_s(8.0) == pytest.approx(0.6)
    assert q.recent_floor_s(30.0) is None


def test_no_recent_sample_is_no_opinion() -> None:
    """A long queue stops the samples (no block answers the latest SR): follow the REMB."""
    q = QueueDelay(stale_s=2.0)
    for i in range(4):
        q.add(0.6, i * 0.5)
    assert not q.confirms(2.0)
    assert q.confirms(4.0)
