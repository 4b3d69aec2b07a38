"""TrackWriter: real VP8/Opus packets (encoded here with PyAV) into WebM segments."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import pytest
from av import AudioFrame, VideoFrame

from media_server.packet import AUDIO_TIME_BASE, VIDEO_TIME_BASE, MediaPacket
from recording.segments import (
    SegmentInfo,
    TrackWriter,
    opus_packet_samples,
    parse_segment_name,
    segment_relpath,
    vp8_dimensions,
)

FPS = 30
FRAME_TICKS = 90000 // FPS


# ---------------------------------------------------------------- media helpers


def _vp8_encoder(
    width: int, height: int, kf_max_dist: int
) -> av.video.codeccontext.VideoCodecContext:
    enc = av.CodecContext.create("libvpx", "w")
    assert isinstance(enc, av.video.codeccontext.VideoCodecContext)
    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
    enc.time_base = VIDEO_TIME_BASE
    enc.framerate = Fraction(FPS)
    enc.bit_rate = 300_000
    enc.gop_size = kf_max_dist
    enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    return enc


def _frame(i: int, width: int, height: int) -> VideoFrame:
    frame = VideoFrame(width, height, "yuv420p")
    for n, plane in enumerate(frame.planes):
        plane.update(bytes([(i * 7 + n * 60) % 256]) * plane.buffer_size)
    frame.pts = i * FRAME_TICKS
    frame.time_base = VIDEO_TIME_BASE
    return frame


def vp8_packets(
    seconds: float,
    *,
    width: int = 320,
    height: int = 240,
    keyframe_every: int = FPS,
    first_frame: int = 0,
    force_keyframe: Callable[[int], bool] | None = None,
) -> Iterator[MediaPacket]:
    """Encode a test pattern; ``force_keyframe(i)`` may force frame i to be a keyframe."""
    enc = _vp8_encoder(width, height, keyframe_every)
    for i in range(int(seconds * FPS)):
        frame = _frame(i, width, height)
        if force_keyframe is not None and force_keyframe(i):
            frame.pict_type = av.video.frame.PictureType.I
        for pkt in enc.encode(frame):
            assert pkt.pts is not None
            yield MediaPacket(
                bytes(pkt),
                pkt.pts + first_frame * FRAME_TICKS,
                VIDEO_TIME_BASE,
                pkt.is_keyframe,
                "video",
            )


def opus_packets(seconds: float) -> list[MediaPacket]:
    enc = av.CodecContext.create("libopus", "w")
    assert isinstance(enc, av.audio.codeccontext.AudioCodecContext)
    enc.sample_rate, enc.layout, enc.format = 48000, "stereo", "s16"
    enc.time_base = AUDIO_TIME_BASE
    out: list[bytes] = []
    for i in range(int(seconds * 50)):
        frame = AudioFrame(format="s16", layout="stereo", samples=960)
        frame.sample_rate = 48000
        frame.pts = i * 960
        for plane in frame.planes:
            plane.update(bytes((k * 37 + i) % 256 for k in range(plane.buffer_size)))
        out.extend(bytes(p) for p in enc.encode(frame))
    # RTP timing: 20 ms packets, pts from 0 (as the SFU delivers them)
    return [MediaPacket(d, n * 960, AUDIO_TIME_BASE, True, "audio") for n, d in enumerate(out)]


@pytest.fixture(scope="module")
def video_6s() -> list[MediaPacket]:
    return list(vp8_packets(6.0, keyframe_every=FPS))


@pytest.fixture(scope="module")
def audio_6s() -> list[MediaPacket]:
    return opus_packets(6.0)


def run_writer(
    packets: list[MediaPacket],
    directory: Path,
    *,
    track_id: str,
    kind: str,
    **kwargs: object,
) -> tuple[TrackWriter, list[SegmentInfo]]:
    segments: list[SegmentInfo] = []
    writer = TrackWriter(
        track_id,
        kind,  # type: ignore[arg-type]
        directory,
        kwargs.pop("session_start", 1000.0),  # type: ignore[arg-type]
        kwargs.pop("first_packet_wall", 1000.0),  # type: ignore[arg-type]
        on_segment=segments.append,
        **kwargs,  # type: ignore[arg-type]
    )
    for packet in packets:
        assert writer.push(packet)
    writer.close()
    return writer, segments


def decode_file(path: Path) -> tuple[int, float, list[bool], tuple[int, int] | None]:
    """(decoded frames or samples, seconds decoded, keyframe flag of each packet, video size)."""
    with av.open(str(path)) as container:
        stream = container.streams[0]
        flags: list[bool] = []
        count = 0
        seconds = 0.0
        size = None
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            flags.append(packet.is_keyframe)
            for frame in packet.decode():
                if isinstance(frame, AudioFrame):
                    count += frame.samples
                    seconds += frame.samples / frame.sample_rate
                else:
                    assert isinstance(frame, VideoFrame)
                    count += 1
                    seconds += 1 / FPS
                    size = (frame.width, frame.height)
    return count, seconds, flags, size


# ---------------------------------------------------------------- bitstream


def test_vp8_dimensions_and_opus_durations(video_6s: list[MediaPacket]) -> None:
    key = next(p for p in video_6s if p.keyframe)
    delta = next(p for p in video_6s if not p.keyframe)
    assert vp8_dimensions(key.data) == (320, 240)
    assert vp8_dimensions(delta.data) is None
    assert opus_packet_samples(opus_packets(0.1)[0].data) == 960
    assert opus_packet_samples(bytes([0b11111_0_00])) == 960  # CELT FB 20 ms, one frame
    assert opus_packet_samples(bytes([0b00011_0_01])) == 2 * 2880  # SILK 60 ms, two frames
    assert opus_packet_samples(b"") is None
    assert parse_segment_name("000012.webm") == (12, False)
    assert parse_segment_name("000012.webm.part") == (12, True)
    assert parse_segment_name("x.webm") is None


# ---------------------------------------------------------------- video


def test_video_segments_start_on_keyframes_and_decode(
    tmp_path: Path, video_6s: list[MediaPacket]
) -> None:
    # keyframes every 1 s; 1.5 s elapsed → cut at the next keyframe (2 s, 4 s), never between
    writer, segments = run_writer(
        video_6s, tmp_path, track_id="cam-a", kind="video", segment_seconds=1.5
    )
    assert [s.index for s in segments] == [0, 1, 2]
    assert writer.stats.written == len(video_6s)
    assert writer.stats.dropped_queue_full == 0
    frames = 0
    for seg in segments:
        assert seg.path == segment_relpath("cam-a", seg.index)
        file = tmp_path / seg.path
        data = file.read_bytes()
        assert hashlib.sha256(data).hexdigest() == seg.sha256
        assert len(data) == seg.size
        count, _, flags, size = decode_file(file)
        assert flags[0], f"segment {seg.index} does not start on a keyframe"
        assert size == (320, 240)
        assert count == seg.packets
        frames += count
    assert frames == len(video_6s)
    total = sum(s.duration_s for s in segments)
    assert abs(total - 6.0) <= 0.5
    assert [s.start_pts_s for s in segments] == pytest.approx([0.0, 2.0, 4.0], abs=0.05)
    assert not list(tmp_path.rglob("*.part"))


def test_rare_keyframes_are_requested_and_bound_the_segment(tmp_path: Path) -> None:
    """A WebRTC publisher sends keyframes only when asked: the writer asks."""
    requests: list[int] = []
    frame_no = [0]

    def on_keyframe_needed() -> None:
        requests.append(frame_no[0])

    def force(i: int) -> bool:
        frame_no[0] = i
        # the publisher answers a request ~3 frames (100 ms) later
        return any(r + 3 == i for r in requests)

    segments: list[SegmentInfo] = []
    writer = TrackWriter(
        "cam-rare",
        "video",
        tmp_path,
        0.0,
        0.0,
        segment_seconds=1.0,
        on_segment=segments.append,
        on_keyframe_needed=on_keyframe_needed,
    )
    for packet in vp8_packets(8.0, keyframe_every=100_000, force_keyframe=force):
        writer.push(packet)
    writer.close()
    assert requests, "no keyframe was requested"
    assert len(segments) >= 3
    for seg in segments[:-1]:
        assert seg.duration_s <= 3 * 1.0 + 0.2
    for seg in segments:
        assert decode_file(tmp_path / seg.path)[2][0]
    assert abs(sum(s.duration_s for s in segments) - 8.0) <= 0.5


def test_resolution_change_starts_a_segment(tmp_path: Path) -> None:
    small = list(vp8_packets(1.0, width=320, height=240))
    large = list(vp8_packets(1.0, width=640, height=360, first_frame=FPS))
    _, segments = run_writer(
        small + large, tmp_path, track_id="cam-b", kind="video", segment_seconds=10.0
    )
    assert len(segments) == 2
    assert decode_file(tmp_path / segments[0].path)[3] == (320, 240)
    assert decode_file(tmp_path / segments[1].path)[3] == (640, 360)


def test_video_before_first_keyframe_is_skipped(
    tmp_path: Path, video_6s: list[MediaPacket]
) -> None:
    asked: list[bool] = []
    writer = TrackWriter(
        "cam-c", "video", tmp_path, 0.0, 0.0, on_keyframe_needed=lambda: asked.append(True)
    )
    start = FPS // 2  # join mid-GOP
    accepted = [writer.push(p) for p in video_6s[start:]]
    writer.close()
    assert accepted[: FPS - start] == [False] * (FPS - start)
    assert writer.stats.skipped_until_keyframe == FPS - start
    assert asked
    first = tmp_path / segment_relpath("cam-c", 0)
    assert decode_file(first)[2][0]


# ---------------------------------------------------------------- audio


def test_audio_segments_late_joiner_offset_and_decode(
    tmp_path: Path, audio_6s: list[MediaPacket]
) -> None:
    writer, segments = run_writer(
        audio_6s,
        tmp_path,
        track_id="mic-late",
        kind="audio",
        session_start=1000.0,
        first_packet_wall=1002.0,  # joined 2 s after the session started
        segment_seconds=4.0,
    )
    assert writer.offset_s == pytest.approx(2.0)
    assert [s.start_pts_s for s in segments] == pytest.approx([0.0, 4.0])
    samples = 0
    for seg in segments:
        count, seconds, flags, _ = decode_file(tmp_path / seg.path)
        assert all(flags)
        assert seconds == pytest.approx(seg.duration_s, abs=0.03)
        samples += count
    assert samples == len(audio_6s) * 960  # OpusHead pre-skip 0: nothing is lost
    assert abs(sum(s.duration_s for s in segments) - 6.0) <= 0.5


def test_offset_defaults_to_wall_clock_of_first_packet(
    tmp_path: Path, audio_6s: list[MediaPacket]
) -> None:
    writer = TrackWriter("mic-d", "audio", tmp_path, 500.0, clock=lambda: 503.25)
    assert writer.offset_s is None
    writer.push(audio_6s[0])
    writer.close()
    assert writer.offset_s == pytest.approx(3.25)


# ---------------------------------------------------------------- threading


def test_push_never_blocks_drops_when_behind_and_resumes_on_keyframe(
    tmp_path: Path, video_6s: list[MediaPacket]
) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    pool.submit(gate.wait)  # the shared worker is busy elsewhere
    segments: list[SegmentInfo] = []
    asked: list[bool] = []
    writer = TrackWriter(
        "cam-e",
        "video",
        tmp_path,
        0.0,
        0.0,
        segment_seconds=2.0,
        executor=pool,
        max_queue=20,
        on_segment=segments.append,
        on_keyframe_needed=lambda: asked.append(True),
    )
    started = time.perf_counter()
    for packet in video_6s:
        writer.push(packet)
    per_push = (time.perf_counter() - started) / len(video_6s)
    assert per_push < 0.001
    assert (
        writer.stats.dropped_queue_full == len(video_6s) - 20 - writer.stats.skipped_until_keyframe
    )
    assert asked
    gate.set()
    writer.close()
    writer.close()  # twice is fine
    pool.shutdown()
    assert writer.stats.written == 20
    assert len(segments) == 1
    assert decode_file(tmp_path / segments[0].path)[2][0]


async def test_aclose_from_the_event_loop(tmp_path: Path, audio_6s: list[MediaPacket]) -> None:
    segments: list[SegmentInfo] = []
    writer = TrackWriter("mic-f", "audio", tmp_path, 0.0, 0.0, on_segment=segments.append)
    for packet in audio_6s[:100]:
        writer.push(packet)
    await writer.aclose()
    await writer.aclose()
    assert len(segments) == 1
    assert segments[0].duration_s == pytest.approx(2.0)
    assert not writer.push(audio_6s[100])


def test_rejects_wrong_kind_and_backwards_timestamps(
    tmp_path: Path, audio_6s: list[MediaPacket]
) -> None:
    writer = TrackWriter("mic-g", "audio", tmp_path, 0.0, 0.0)
    assert writer.push(audio_6s[5])
    assert not writer.push(audio_6s[4])
    assert not writer.push(MediaPacket(b"\x10", 0, VIDEO_TIME_BASE, False, "video"))
    writer.close()
    assert writer.stats.rejected == 2
    with pytest.raises(ValueError):
        TrackWriter("../escape", "audio", tmp_path, 0.0, 0.0)


def test_disk_errors_are_counted_and_close_still_returns(
    tmp_path: Path, audio_6s: list[MediaPacket]
) -> None:
    (tmp_path / "tracks").mkdir()
    (tmp_path / "tracks" / "mic-h").write_bytes(b"not a directory")
    segments: list[SegmentInfo] = []
    writer = TrackWriter("mic-h", "audio", tmp_path, 0.0, 0.0, on_segment=segments.append)
    for packet in audio_6s[:60]:
        writer.push(packet)
    writer.close()
    assert segments == []
    assert writer.stats.errors == 60
    assert writer.stats.written == 0
