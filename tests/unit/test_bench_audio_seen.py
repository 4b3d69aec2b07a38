"""bench.audio_seen: a mix whose timestamps jump is flagged, not silently counted as lost."""

from __future__ import annotations

from bench.audio_seen import MixSegment, mix_phase, mix_timestamp_jumps

FRAME_S = 0.06
TICKS = 48 * 60


def _segment(jump_at: int | None, jump_ticks: int) -> MixSegment:
    segment = MixSegment(1.0, 19.0, "0", 60, ("a",), "12k/60ms x1")
    for i in range(300):  # 18 s of 60 ms frames, every one delivered
        sent = 1.0 + i * FRAME_S
        ts = 1000 + i * TICKS + (jump_ticks if jump_at is not None and i >= jump_at else 0)
        segment.packets.append((sent + 0.4, sent, ts))
    return segment


def test_a_steady_mix_has_no_jump_and_no_loss() -> None:
    segment = _segment(None, 0)
    assert mix_timestamp_jumps(segment) == []
    expected, received, hole, _ = mix_phase(segment, 0.0, 20.0)
    assert received == expected and hole == 0.0


def test_a_forward_jump_reads_as_a_hole_and_is_flagged() -> None:
    segment = _segment(100, 100 * TICKS)  # 6 s ahead, every frame still arriving
    _, _, hole, _ = mix_phase(segment, 0.0, 20.0)
    assert hole >= 5_000  # what the benchmark would call an interrupted call
    jumps = mix_timestamp_jumps(segment)
    assert len(jumps) == 1
    sent, seconds = jumps[0]
    assert abs(sent - (1.0 + 100 * FRAME_S)) < 1e-9 and abs(seconds - 6.06) < 1e-9


def test_an_off_grid_step_is_flagged() -> None:
    assert len(mix_timestamp_jumps(_segment(50, TICKS // 2))) == 1


def test_a_straggler_of_the_previous_mix_does_not_move_the_grid() -> None:
    segment = _segment(None, 0)
    # a packet of the previous mix left the server just after this period began and
    # arrived first; its timestamp is 0.019 s off this mix's grid
    segment.packets.insert(0, (1.3, 1.0005, 1000 - 912))
    expected, received, hole, _ = mix_phase(segment, 0.0, 20.0)
    assert expected >= 299 and received == expected and hole == 0.0
