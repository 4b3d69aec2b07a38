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


def test_fast_clock_matches_aiortc_clock() -> None:
    import aiortc.clock as clock

    reference = clock.datetime_to_ntp(clock.current_datetime())
    fast = hooks._fast_ntp_time()
    # same NTP epoch and resolution: within 50 ms of each other
    assert abs(fast - reference) < int(0.05 * (1 << 32))
    reference_ms = int((clock.current_datetime() - clock.NTP_EPOCH).total_seconds() * 1000)
    assert abs(hooks._fast_ms() - reference_ms) < 50
