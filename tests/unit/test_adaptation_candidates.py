"""The layers a viewer is offered for one video: the original costs more than its rungs."""

from __future__ import annotations

from aiortc import VideoStreamTrack

from media_server.adaptation import LadderPool, SubscriberAdaptation, priced
from media_server.allocator import ORIGINAL, Allocator, Layer, VideoCandidate
from media_server.forwarder import Forwarder, TrackInfo


def camera() -> Forwarder:
    info = TrackInfo("pub:camera", "pub", "video", "camera")
    forwarder = Forwarder(info, VideoStreamTrack(), None)
    forwarder.frame_size = (640, 360)
    return forwarder


def costs(candidate: VideoCandidate) -> dict[str, int]:
    return {layer.name: layer.bitrate for layer in candidate.layers}


def measured(
    adaptation: SubscriberAdaptation, forwarder: Forwarder, kbps: list[int], start: int = 1
) -> None:
    """The original sends ``kbps`` in successive seconds from ``start`` (measured at each)."""
    for second, rate in enumerate(kbps, start=start):
        forwarder.wire_bytes += rate * 1000 // 8
        adaptation._measure(forwarder, float(second))


def test_a_dip_in_the_originals_rate_keeps_the_viewers_rung_and_the_original_dearer() -> None:
    adaptation = SubscriberAdaptation("viewer", LadderPool(), None)
    forwarder = camera()
    adaptation._measure(forwarder, 0.0)
    measured(adaptation, forwarder, [560])
    assert "360p" in costs(adaptation._candidate(forwarder))
    # between two keyframes: 0.7 x 560 + 0.3 x 320 = 488 kbit/s, and 360p needs 500
    measured(adaptation, forwarder, [320], start=2)
    afresh = costs(adaptation._candidate(forwarder))
    assert "360p" not in afresh and "288p" in afresh
    adaptation.layers["pub:camera"] = "360p"  # the viewer is on it
    on_it = costs(priced(adaptation._candidate(forwarder), 1))
    assert "360p" in on_it
    # the viewer on 360p must not be "downgraded" to a cheaper-looking original
    assert on_it[ORIGINAL] > max(cost for name, cost in on_it.items() if name != ORIGINAL)


def test_a_rung_larger_than_the_original_is_never_kept() -> None:
    adaptation = SubscriberAdaptation("viewer", LadderPool(), None)
    forwarder = camera()
    adaptation._measure(forwarder, 0.0)
    measured(adaptation, forwarder, [2000])
    adaptation.layers["pub:camera"] = "432p"
    assert "432p" not in costs(adaptation._candidate(forwarder))


def test_a_rung_sent_twice_never_makes_the_original_look_cheaper() -> None:
    """On a lossy long-RTT link rungs go twice; the original, sent once, would freeze."""
    candidate = VideoCandidate(
        "pub:camera", 0, (Layer(ORIGINAL, 540_000), Layer("360p", 431_520), Layer("144p", 80_000))
    )
    doubled = costs(priced(candidate, 2))
    assert doubled["360p"] == 863_040 and doubled["144p"] == 160_000
    assert doubled[ORIGINAL] > doubled["360p"]
    # a viewer on 360p whose budget falls below it goes down a rung, not to the original
    allocator = Allocator()
    assert allocator.allocate(1_000_000, [priced(candidate, 2)], 0)["pub:camera"].layer == "360p"
    assert allocator.allocate(600_000, [priced(candidate, 2)], 0)["pub:camera"].layer == "144p"
