"""Composite render of a real (synthetic) recording: layout, labels, speaker, sync, mix.

Three participants publish solid-colour 320x180 VP8 video and an Opus tone each,
written with TrackWriter and Manifest exactly as the Recorder does:

- Anna (red, 400 Hz, loud) from 0 to 5 s;
- Борис (green, 600 Hz, quiet) from 0 to 3 s, his camera stops at 1.2 s;
- Chen (blue, 1000 Hz, quiet) joins at 2 s and stays to 5 s.

The render (640x360) is decoded back and checked where a viewer would look.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import av
import pytest
from av import VideoFrame

from recording.composite import (
    HIGHLIGHT_RGB,
    RenderError,
    RenderResult,
    grid_shape,
    render_composite,
    tile_rects,
)
from recording.manifest import Manifest
from recording.render_cli import add_render_arguments, run_render
from tests.media import solid_vp8, tone_opus, write_track

OUT_W, OUT_H = 640, 360


class Person:
    def __init__(
        self,
        pid: str,
        name: str,
        clinic: str,
        rgb: tuple[int, int, int],
        tone_hz: int,
        level: float,
        span: tuple[float, float],
        camera: tuple[float, float],
    ) -> None:
        self.pid, self.name, self.clinic, self.rgb = pid, name, clinic, rgb
        self.tone_hz, self.level, self.span, self.camera = tone_hz, level, span, camera


PEOPLE = [
    Person("anna", "Anna Ivanova", "Regional Hospital", (220, 40, 40), 400, 0.5, (0, 5), (0, 5)),
    Person("boris", "Борис Петров", "ФАП Заречье", (40, 200, 40), 600, 0.05, (0, 3), (0, 1.2)),
    Person("chen", "Chen Wei", "Federal Centre", (40, 60, 220), 1000, 0.05, (2, 5), (2, 5)),
]


# ---------------------------------------------------------------- synthetic recording


def make_recording(directory: Path) -> Path:
    with Manifest(directory) as manifest:
        manifest.recording_started(recording_id="rec-1", room="council", consultation_id="c-1")
        for p in PEOPLE:
            manifest.participant(p.pid, name=p.name, clinic=p.clinic, tier="lan", role="doctor")
            manifest.event("join", {"offset_s": p.span[0]}, participant_id=p.pid)
        for p in PEOPLE:
            start, end = p.span
            audio = tone_opus(p.tone_hz, p.level, end - start)
            write_track(manifest, directory, p.pid, "audio", audio, start)
            video = solid_vp8(p.rgb, p.camera[1] - p.camera[0])
            write_track(manifest, directory, p.pid, "video", video, p.camera[0])
            if end < 5:
                manifest.event("leave", {"offset_s": end}, participant_id=p.pid)
        manifest.recording_stopped()
    return directory


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[RenderResult, list[float]]:
    directory = make_recording(tmp_path_factory.mktemp("rec"))
    calls: list[float] = []
    result = render_composite(
        directory, directory / "composite.webm", width=OUT_W, height=OUT_H, progress=calls.append
    )
    return result, calls


# ---------------------------------------------------------------- decoding helpers


class Picture:
    def __init__(self, frame: VideoFrame) -> None:
        rgb = frame.reformat(format="rgb24")
        self.data, self.stride = bytes(rgb.planes[0]), rgb.planes[0].line_size

    def at(self, x: int, y: int, r: int = 2) -> tuple[int, int, int]:
        """Mean colour of the (2r)x(2r) patch around (x, y)."""
        total = [0, 0, 0]
        for yy in range(y - r, y + r):
            for xx in range(x - r, x + r):
                for c in range(3):
                    total[c] += self.data[yy * self.stride + xx * 3 + c]
        n = (2 * r) ** 2
        return total[0] // n, total[1] // n, total[2] // n


def near(got: tuple[int, int, int], want: tuple[int, int, int], tol: int = 45) -> bool:
    return all(abs(g - w) <= tol for g, w in zip(got, want, strict=True))


def dark(got: tuple[int, int, int]) -> bool:
    return max(got) < 40


def decode_video(path: Path) -> list[tuple[float, Picture]]:
    with av.open(str(path)) as container:
        return [
            (float(f.time or 0.0), Picture(f))
            for f in container.decode(video=0)
            if isinstance(f, VideoFrame)
        ]


def decode_audio(path: Path) -> list[float]:
    """Left channel, -1..1."""
    out: list[float] = []
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=48000)
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            for f in resampler.resample(frame):
                raw = bytes(f.planes[0])[: f.samples * 4]
                out.extend(
                    int.from_bytes(raw[i : i + 2], "little", signed=True) / 32768
                    for i in range(0, len(raw), 4)
                )
    return out


def tone_level(samples: list[float], hz: int, start_s: float, end_s: float) -> float:
    """Goertzel magnitude of ``hz`` in [start_s, end_s), normalised to the amplitude."""
    window = samples[int(start_s * 48000) : int(end_s * 48000)]
    coeff = 2 * math.cos(2 * math.pi * hz / 48000)
    s1 = s2 = 0.0
    for x in window:
        s1, s2 = x + coeff * s1 - s2, s1
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return 2 * math.sqrt(max(power, 0.0)) / len(window)


def frame_at(frames: list[tuple[float, Picture]], t: float) -> Picture:
    return min(frames, key=lambda item: abs(item[0] - t))[1]


# ---------------------------------------------------------------- tests


def test_layout_shapes() -> None:
    shapes = {n: grid_shape(n) for n in range(1, 11)}
    assert shapes == {
        1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (2, 2), 5: (3, 2),
        6: (3, 2), 7: (3, 3), 8: (3, 3), 9: (3, 3), 10: (4, 3),
    }  # fmt: skip
    three = tile_rects(3, 640, 360)
    assert [(r.x, r.y, r.w, r.h) for r in three] == [
        (0, 0, 320, 180),
        (320, 0, 320, 180),
        (160, 180, 320, 180),  # the incomplete last row is centred
    ]
    for n in range(1, 17):
        for r in tile_rects(n, 1280, 720):
            assert r.x % 2 == r.y % 2 == r.w % 2 == r.h % 2 == 0
            assert r.x >= 0 and r.y >= 0 and r.x + r.w <= 1280 and r.y + r.h <= 720
            assert abs(r.w / r.h - 16 / 9) < 0.05


def test_render_plays_with_one_video_and_one_audio_stream(
    rendered: tuple[RenderResult, list[float]],
) -> None:
    result, calls = rendered
    assert result.out_path.exists()
    assert not result.out_path.with_name(result.out_path.name + ".part").exists()
    assert abs(result.duration_s - 5.0) <= 0.5
    assert result.frames == round(result.duration_s * 15)
    assert result.speed_x > 0 and result.seconds_taken > 0
    assert result.skipped_segments == ()
    with av.open(str(result.out_path)) as container:
        assert len(container.streams.video) == 1
        assert len(container.streams.audio) == 1
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "vp8"
        assert audio.codec_context.name == "opus"
        assert (video.codec_context.width, video.codec_context.height) == (OUT_W, OUT_H)
        assert container.duration is not None
        assert abs(container.duration / 1e6 - 5.0) <= 0.5
    assert calls[-1] == 1.0
    assert calls == sorted(calls) and len(calls) >= 10


def test_late_joiner_leaver_and_paused_camera_in_the_grid(
    rendered: tuple[RenderResult, list[float]],
) -> None:
    frames = decode_video(rendered[0].out_path)
    assert abs(len(frames) - 75) <= 1
    blue = PEOPLE[2].rgb
    red, green = PEOPLE[0].rgb, PEOPLE[1].rgb

    def chen_visible(pic: Picture) -> bool:
        # Chen's tile: bottom centre of the 2x2 grid (3 present), right of the 2x1 grid (2)
        return near(pic.at(320, 270), blue) or near(pic.at(480, 180), blue)

    first_blue = min(t for t, pic in frames if chen_visible(pic))
    assert 1.95 <= first_blue <= 2.2, f"Chen appears at {first_blue:.2f} s, joined at 2 s"
    assert all(chen_visible(pic) for t, pic in frames if 2.2 <= t < 4.9)

    before = frame_at(frames, 1.0)  # 2x1: Anna left, Boris right
    assert near(before.at(160, 180), red)
    assert near(before.at(480, 180), green)
    assert dark(before.at(320, 330)) and dark(before.at(320, 30))  # no tile there yet

    three = frame_at(frames, 2.6)  # 2x2: Anna, Boris (camera stopped at 1.2 s), Chen
    assert near(three.at(160, 90), red)
    assert near(three.at(480, 20), (44, 52, 64), tol=30), "Boris: placeholder, not a frozen frame"
    assert near(three.at(320, 270), blue)

    after = frame_at(frames, 4.0)  # Boris left at 3 s: 2x1 again, Anna and Chen
    assert near(after.at(160, 180), red)
    assert near(after.at(480, 180), blue)
    assert not any(near(after.at(x, y), green) for x in (160, 480) for y in (120, 180, 240))


def test_labels_and_active_speaker_highlight(
    rendered: tuple[RenderResult, list[float]],
) -> None:
    frames = decode_video(rendered[0].out_path)
    pic = frame_at(frames, 1.0)  # Anna's picture: (0, 90)-(320, 270); Boris's: (320, 90)-(640, 270)
    assert near(pic.at(160, 92, r=1), HIGHLIGHT_RGB), "the loud speaker's tile is framed"
    assert near(pic.at(2, 180, r=1), HIGHLIGHT_RGB)
    assert not near(pic.at(480, 92, r=1), HIGHLIGHT_RGB), "the quiet one's is not"
    for x0 in (0, 320):  # a label strip with light text at the bottom of each tile
        strip = [pic.at(x, y, r=1) for x in range(x0 + 6, x0 + 200, 2) for y in range(242, 266, 2)]
        assert sum(1 for c in strip if min(c) > 170) >= 15
        centre = [pic.at(x, y, r=1) for x in range(x0 + 60, x0 + 260, 8) for y in (150, 170)]
        assert not any(min(c) > 170 for c in centre)
    late = frame_at(frames, 4.0)
    assert near(late.at(160, 92, r=1), HIGHLIGHT_RGB)
    assert not near(late.at(480, 92, r=1), HIGHLIGHT_RGB)


def test_audio_is_mixed_on_the_session_clock(
    rendered: tuple[RenderResult, list[float]],
) -> None:
    samples = decode_audio(rendered[0].out_path)
    assert abs(len(samples) / 48000 - 5.0) <= 0.5
    assert max(abs(s) for s in samples) < 0.95  # limited, never clipped
    anna = tone_level(samples, 400, 0.5, 4.5)
    assert 0.35 <= anna <= 0.6, anna  # the loud tone keeps its level (no normalisation)
    boris_in, boris_out = tone_level(samples, 600, 0.5, 2.5), tone_level(samples, 600, 3.5, 4.5)
    chen_out, chen_in = tone_level(samples, 1000, 0.5, 1.8), tone_level(samples, 1000, 2.5, 4.5)
    assert boris_in > 0.02 and boris_out < boris_in / 10, (boris_in, boris_out)
    assert chen_in > 0.02 and chen_out < chen_in / 10, (chen_in, chen_out)
    # the joiner's tone starts at 2 s: silent in 1.8-1.95, present in 2.05-2.2
    assert tone_level(samples, 1000, 1.8, 1.95) < chen_in / 5
    assert tone_level(samples, 1000, 2.05, 2.2) > chen_in / 2


def test_missing_manifest_or_media_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="no manifest"):
        render_composite(tmp_path, tmp_path / "out.webm")
    with Manifest(tmp_path) as manifest:
        manifest.recording_started(recording_id="r", room="x", consultation_id="c")
    with pytest.raises(RenderError, match="no segment"):
        render_composite(tmp_path, tmp_path / "out.webm")
    assert not (tmp_path / "out.webm").exists()


def test_cli_renders_with_a_progress_bar(
    rendered: tuple[RenderResult, list[float]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    (data / "recordings").mkdir(parents=True)
    (data / "recordings" / "rec-1").symlink_to(rendered[0].out_path.parent)
    parser = argparse.ArgumentParser()
    add_render_arguments(parser)
    out = tmp_path / "out.webm"
    argv = ["rec-1", "--data-dir", str(data), "--out", str(out), "--size", "320x180"]
    assert run_render(parser.parse_args(argv)) == 0
    captured = capsys.readouterr()
    assert "rendering [" in captured.err and "100%" in captured.err
    assert str(out) in captured.out and "real time" in captured.out
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.width == 320
    assert run_render(parser.parse_args(["nope", "--data-dir", str(data)])) == 1
    assert run_render(parser.parse_args(["../rec-1", "--data-dir", str(data)])) == 2
    assert "no recording nope" in capsys.readouterr().err
