"""Liveness: a silent WebSocket is dead, unless the participant's media still flows."""

from __future__ import annotations

from signalling.liveness import (
    PING_AFTER_S,
    SILENT_S,
    SILENT_WITH_MEDIA_S,
    Liveness,
    Verdict,
)


def run(liveness: Liveness, start: float, end: float, step: float = 0.5) -> list[Verdict]:
    out = []
    t = start
    while t <= end + 1e-9:
        out.append(liveness.check(t))
        t += step
    return out


def test_a_talking_client_is_alive_and_never_pinged() -> None:
    live = Liveness(0.0)
    for i in range(40):
        live.heard(i * 0.5)
        assert live.check(i * 0.5 + 0.1) is Verdict.ALIVE


def test_silence_is_pinged_then_dead_after_5_s() -> None:
    live = Liveness(0.0)
    verdicts = run(live, 0.5, SILENT_S)
    assert Verdict.PING in verdicts
    assert verdicts[-1] is Verdict.DEAD
    assert Verdict.DEAD not in verdicts[:-1]


def test_a_late_pong_is_fine() -> None:
    live = Liveness(0.0)
    run(live, 0.5, PING_AFTER_S)
    live.heard(SILENT_S - 0.5)  # the pong arrives 2.5 s after the ping
    assert Verdict.DEAD not in run(live, SILENT_S - 0.5, SILENT_S + 3)


def test_media_flowing_keeps_a_silent_websocket_alive_up_to_20_s() -> None:
    packets = 0

    def media() -> int:
        return packets

    live = Liveness(0.0, media)
    t = 0.5
    verdicts = []
    while t < SILENT_WITH_MEDIA_S + 1:
        packets += 50
        verdicts.append((t, live.check(t)))
        t += 0.5
    dead = [t for t, v in verdicts if v is Verdict.DEAD]
    assert dead and dead[0] >= SILENT_WITH_MEDIA_S


def test_media_that_stopped_does_not_keep_it_alive() -> None:
    packets = 0

    def media() -> int:
        return packets

    live = Liveness(0.0, media)
    for i in range(1, 5):  # media for 2 s, then nothing
        packets += 50
        live.check(i * 0.5)
    assert run(live, 2.5, SILENT_S + 0.5)[-1] is Verdict.DEAD


def test_a_failing_media_probe_is_no_evidence() -> None:
    def media() -> int:
        raise RuntimeError("torn down")

    live = Liveness(0.0, media)
    assert run(live, 0.5, SILENT_S)[-1] is Verdict.DEAD
