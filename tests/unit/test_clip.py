"""The pre-encoded clip that load-test bots replay: valid, loopable, cached."""

from __future__ import annotations

import itertools
from array import array
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import pytest
from av.audio.codeccontext import AudioCodecContext

from media_server import clip as clip_module
from media_server.clip import Clip, decode_check, default_cache_dir, load_clip
from media_server.packet import is_vp8_keyframe

SECONDS = 2.0
INTERVAL = 30
FRAMES = 60  # SECONDS at 30 fps
AUDIO_FRAMES = 100  # SECONDS of 20 ms frames


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="module")
def clip(cache_dir: Path) -> Clip:
    return load_clip(cache_dir, seconds=SECONDS, keyframe_interval=INTERVAL)


def _decode_video(packets: list[bytes]) -> list[av.VideoFrame]:
    codec = av.CodecContext.create("libvpx", "r")
    frames: list[av.VideoFrame] = []
    for i, data in enumerate(packets):
        packet = av.Packet(data)
        packet.pts = i * 3000
        packet.time_base = Fraction(1, 90000)
        frames.extend(codec.decode(packet))
    frames.extend(codec.decode(None))
    return frames


def _channel0(frame: av.AudioFrame) -> list[float]:
    """First channel of a decoded frame as floats in [-1, 1]."""
    raw = bytes(frame.planes[0])
    name = frame.format.name
    channels = len(frame.layout.channels)
    if name == "fltp":
        return list(array("f", raw)[: frame.samples])
    if name == "flt":
        return list(array("f", raw)[: frame.samples * channels : channels])
    if name == "s16":
        return [v / 32768 for v in array("h", raw)[: frame.samples * channels : channels]]
    raise AssertionError(f"unexpected sample format {name}")


def test_every_video_packet_decodes(clip: Clip) -> None:
    assert len(clip.video) == FRAMES
    assert decode_check(clip) == len(clip.video)


def test_pictures_are_640x360_and_move(clip: Clip) -> None:
    frames = _decode_video([p.data for p in clip.video])
    assert (clip.width, clip.height) == (640, 360)
    assert {(f.width, f.height) for f in frames} == {(640, 360)}
    lumas = [bytes(f.planes[0]) for f in frames]
    assert all(a != b for a, b in itertools.pairwise(lumas))


def test_video_replays_in_a_loop(clip: Clip) -> None:
    """A bot restarts at frame 0: one decoder fed two laps decodes every frame."""
    laps = [p.data for p in clip.video] * 2
    assert len(_decode_video(laps)) == 2 * FRAMES


def test_keyframes_at_the_interval_and_flagged(clip: Clip) -> None:
    assert clip.video[0].keyframe
    assert clip.keyframe_indices == tuple(range(0, FRAMES, INTERVAL)) == (0, 30)
    for i, packet in enumerate(clip.video):
        assert packet.keyframe == is_vp8_keyframe(packet.data) == (i % INTERVAL == 0), i


def test_timestamps(clip: Clip) -> None:
    assert [p.pts for p in clip.video] == [i * 3000 for i in range(FRAMES)]
    assert {p.time_base for p in clip.video} == {Fraction(1, 90000)}
    assert {p.kind for p in clip.video} == {"video"}
    assert [p.pts for p in clip.audio] == [i * 960 for i in range(AUDIO_FRAMES)]
    assert {p.time_base for p in clip.audio} == {Fraction(1, 48000)}
    assert {p.kind for p in clip.audio} == {"audio"}
    assert clip.fps == 30
    assert clip.duration_s == pytest.approx(SECONDS)
    assert clip.video_loop_pts == FRAMES * 3000
    assert clip.audio_loop_pts == AUDIO_FRAMES * 960


def test_video_bitrate_near_target(clip: Clip) -> None:
    measured = 8 * sum(len(p.data) for p in clip.video) / SECONDS
    assert clip.video_bitrate == round(measured)
    assert 350_000 <= clip.video_bitrate <= 650_000


@pytest.mark.parametrize("decoder", ["opus", "libopus"])
def test_audio_packets_decode_to_20ms(clip: Clip, decoder: str) -> None:
    codec = cast(AudioCodecContext, av.CodecContext.create(decoder, "r"))
    for packet in clip.audio:
        encoded = av.Packet(packet.data)
        encoded.pts = packet.pts
        encoded.time_base = packet.time_base
        frames = codec.decode(encoded)
        assert [(f.samples, f.sample_rate) for f in frames] == [(960, 48000)]


def test_audio_loops_without_a_click(clip: Clip) -> None:
    codec = av.CodecContext.create("libopus", "r")
    samples: list[float] = []
    for lap in range(2):
        for packet in clip.audio:
            encoded = av.Packet(packet.data)
            encoded.pts = packet.pts + lap * clip.audio_loop_pts
            encoded.time_base = packet.time_base
            for frame in codec.decode(encoded):
                samples.extend(_channel0(frame))
    seam = AUDIO_FRAMES * 960
    steps = [abs(b - a) for a, b in itertools.pairwise(samples)]
    loudest = max(abs(s) for s in samples)
    assert loudest > 0.1  # a tone is there
    steady = max(steps[2000 : seam - 100] + steps[seam + 100 :])
    assert max(steps[seam - 100 : seam + 100]) <= 1.5 * steady


def test_cache_file_is_a_webm_with_both_tracks(cache_dir: Path, clip: Clip) -> None:
    path = cache_dir / f"clip-640x360-30-500000-{SECONDS}-{INTERVAL}.webm"
    assert path.is_file()
    assert not list(cache_dir.glob("*.tmp"))
    with av.open(str(path)) as container:
        assert container.format.name.startswith("matroska")
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.width, video.height) == ("vp8", 640, 360)
        assert audio.codec_context.name in ("opus", "libopus")
        counts = {"video": 0, "audio": 0}
        for packet in container.demux(video, audio):
            if packet.size:
                counts[packet.stream.type] += 1
    assert counts == {"video": FRAMES, "audio": AUDIO_FRAMES}


def test_cache_hit_does_not_encode(
    cache_dir: Path, clip: Clip, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(clip_module, "encode_clip", refuse)
    again = load_clip(cache_dir, seconds=SECONDS, keyframe_interval=INTERVAL)
    assert [p.data for p in again.video] == [p.data for p in clip.video]
    assert [p.data for p in again.audio] == [p.data for p in clip.audio]
    assert again == clip


def test_damaged_cache_is_encoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings: dict[str, Any] = {"width": 160, "height": 90, "seconds": 0.5, "keyframe_interval": 5}
    first = load_clip(tmp_path, **settings)
    (path,) = tmp_path.glob("*.webm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a half-written file from an older version

    calls = []
    real = clip_module.encode_clip

    def counting(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(clip_module, "encode_clip", counting)
    second = load_clip(tmp_path, **settings)
    assert len(calls) == 1
    assert len(second.video) == len(first.video) == 15
    assert decode_check(second) == 15
    assert path.stat().st_size > len(data) // 2


def test_default_cache_dir_follows_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KONSILIUM_CLIP_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "konsilium-clips"


@pytest.mark.parametrize(
    "settings",
    [{"width": 641}, {"height": 0}, {"fps": 0}, {"seconds": 0.001}, {"keyframe_interval": 0}],
)
def test_bad_settings_are_refused(tmp_path: Path, settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        load_clip(tmp_path, **settings)
