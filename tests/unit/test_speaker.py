"""Active speaker from RFC 6464 levels: voice activity and the floor's hysteresis."""

from __future__ import annotations

from media_server.speaker import TAKE_FLOOR_S, AudioLevel, SpeakerDetector


def feed(meter: AudioLevel, level: int, start: float, end: float) -> None:
    t = start
    while t < end - 1e-9:
        meter.add(level, t)
        t += 0.02


def test_activity_is_the_share_of_voiced_packets_in_the_last_second() -> None:
    meter = AudioLevel()
    feed(meter, 20, 0.0, 0.5)  # voice
    feed(meter, 120, 0.5, 1.0)  # silence
    assert 0.45 <= meter.activity(1.0) <= 0.55
    assert meter.activity(3.0) == 0.0  # nothing arrived for two seconds


def test_the_first_speaker_takes_the_floor_at_once() -> None:
    det = SpeakerDetector()
    assert det.update({"a": 0.9, "b": 0.0}, 0.0)
    assert det.speaker == "a"


def test_a_challenger_needs_a_second_of_clearly_more_speech() -> None:
    det = SpeakerDetector()
    det.update({"a": 0.9, "b": 0.0}, 0.0)
    t = 0.5
    changed_at = None
    while t < 5:
        if det.update({"a": 0.1, "b": 0.8}, t) and changed_at is None:
            changed_at = t
        t += 0.5
    assert det.speaker == "b"
    assert changed_at is not None and changed_at - 0.5 >= TAKE_FLOOR_S


def test_a_cough_does_not_take_the_floor() -> None:
    det = SpeakerDetector()
    det.update({"a": 0.9, "b": 0.0}, 0.0)
    det.update({"a": 0.8, "b": 0.5}, 0.5)  # b speaks briefly, less than the margin above a
    det.update({"a": 0.8, "b": 0.9}, 1.0)  # then louder, but only for half a second
    det.update({"a": 0.8, "b": 0.0}, 1.5)
    assert det.speaker == "a"


def test_silence_keeps_the_last_speaker() -> None:
    det = SpeakerDetector()
    det.update({"a": 0.9, "b": 0.0}, 0.0)
    for i in range(1, 20):
        det.update({"a": 0.0, "b": 0.0}, i * 0.5)
    assert det.speaker == "a"


def test_a_speaker_who_left_gives_up_the_floor() -> None:
    det = SpeakerDetector()
    det.update({"a": 0.9, "b": 0.0}, 0.0)
    det.update({"b": 0.0}, 0.5)
    assert det.speaker is None
    assert det.update({"b": 0.6}, 1.0)
    assert det.speaker == "b"
