"""The aiortc internals the SFU relies on are still there (fails loudly if not)."""

from __future__ import annotations

from aiortc import RTCRtpReceiver

from media_server import hooks


def test_check_hooks_passes_on_the_pinned_aiortc() -> None:
    hooks.check_hooks()


def test_passthrough_install_is_idempotent_and_reversible() -> None:
    was = hooks.passthrough_installed()
    try:
        hooks.uninstall_passthrough()
        plain = RTCRtpReceiver.receive
        hooks.install_passthrough()
        hooks.install_passthrough()
        assert RTCRtpReceiver.receive is not plain
        hooks.check_hooks()  # still sees the original internals through the wrapper
        hooks.uninstall_passthrough()
        assert RTCRtpReceiver.receive is plain
    finally:
        if was:
            hooks.install_passthrough()


def test_sent_reports_answer_by_lsr_and_refuse_an_ambiguous_one() -> None:
    sent = hooks._SentReports()
    for i in range(hooks.SR_MEMORY + 2):
        sent.add(1000 + i, 50.0 + i)
    assert sent.sent_at(1000 + hooks.SR_MEMORY + 1) == 50.0 + hooks.SR_MEMORY + 1
    assert sent.sent_at(1002) == 52.0  # an older SR: still known
    assert sent.sent_at(1000) is None  # forgotten
    sent.add(7, 70.0)
    sent.add(7, 71.0)  # an idle sender: the same LSR twice, which one was answered?
    assert sent.sent_at(7) is None


def test_fast_clock_matches_aiortc_clock() -> None:
    import aiortc.clock as clock

    reference = clock.datetime_to_ntp(clock.current_datetime())
    fast = hooks._fast_ntp_time()
    # same NTP epoch and resolution: within 50 ms of each other
    assert abs(fast - reference) < int(0.05 * (1 << 32))
    reference_ms = int((clock.current_datetime() - clock.NTP_EPOCH).total_seconds() * 1000)
    assert abs(hooks._fast_ms() - reference_ms) < 50


def _rtp(seq: int, ts: int, marker: bool) -> object:
    from aiortc.rtp import RtpPacket

    packet = RtpPacket(sequence_number=seq, timestamp=ts, marker=int(marker))
    packet._data = f"{seq}".encode()  # type: ignore[attr-defined]
    return packet


def test_gap_skipping_jitter_buffer_does_not_freeze_behind_a_lost_packet() -> None:
    import time

    buffer = hooks.GapSkippingJitterBuffer(capacity=512, max_wait_s=0.05)
    # frame 1 (seq 0-1) complete, frame 2 loses seq 2, frames 3.. (one packet each) follow
    assert buffer.add(_rtp(0, 1000, False))[1] is None
    assert buffer.add(_rtp(1, 1000, True))[1] is None
    # seq 2 (first packet of frame 2000) is lost; frame 2000 ends at seq 3
    assert buffer.add(_rtp(3, 2000, True))[1] is None  # everything waits behind the hole
    assert buffer.add(_rtp(4, 3000, True))[1] is None
    time.sleep(0.06)
    pli, frame = buffer.add(_rtp(5, 4000, True))
    assert pli, "a skipped gap must ask for a keyframe"
    # jumped to live: the frame after the hole (3000), the one with the hole (2000) given up
    assert frame is not None and frame.timestamp == 3000
    assert buffer.gaps_skipped == 1
    pli, frame = buffer.add(_rtp(6, 5000, True))
    assert frame is not None and frame.timestamp == 4000  # and it flows again
    # aiortc's own buffer would still be waiting
    from aiortc.jitterbuffer import JitterBuffer

    plain = JitterBuffer(capacity=512, is_video=True)
    for seq, ts, marker in ((0, 1000, False), (1, 1000, True), (3, 2000, True), (4, 3000, True)):
        plain.add(_rtp(seq, ts, marker))  # type: ignore[arg-type]
    assert plain.add(_rtp(5, 4000, True))[1] is None  # type: ignore[arg-type]


def test_gap_skipping_waits_longer_once_repairs_are_seen_to_take_longer() -> None:
    """On a satellite link a retransmission takes ~0.7 s: giving up after 0.25 s would
    turn every lost packet into a keyframe request."""
    import time

    buffer = hooks.GapSkippingJitterBuffer(capacity=512, max_wait_s=0.02)
    assert buffer.max_wait_s == 0.02
    buffer.add(_rtp(0, 1000, True))
    buffer.add(_rtp(2, 3000, True))  # seq 1 missing
    time.sleep(0.06)
    buffer.add(_rtp(1, 2000, True))  # ... repaired 60 ms later
    assert buffer.repair_s is not None and buffer.repair_s >= 0.05
    assert buffer.max_wait_s >= 1.3 * 0.05
    # a new hole now waits for its repair instead of jumping after 20 ms
    buffer.add(_rtp(4, 5000, True))  # seq 3 missing
    time.sleep(0.03)
    _, frame = buffer.add(_rtp(5, 6000, True))
    assert buffer.gaps_skipped == 0 and frame is None
    _, frame = buffer.add(_rtp(3, 4000, True))  # the repair arrives: frames flow, in order
    assert frame is not None and buffer.gaps_skipped == 0
    assert hooks.GAP_WAIT_CAP_S >= buffer.max_wait_s
