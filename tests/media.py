"""Real media for recording tests: solid-colour VP8 and tone Opus, written as a recording."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
from av import AudioFrame, VideoFrame

from media_server.packet import AUDIO_TIME_BASE, VIDEO_TIME_BASE, MediaPacket
from recording.keyring import DataKey
from recording.manifest import Manifest
from recording.segments import Kind, SegmentInfo, TrackWriter

FPS_IN = 15
SESSION_START = 1000.0


def solid_vp8(rgb: tuple[int, int, int], seconds: float) -> Iterator[MediaPacket]:
    """320x180 VP8 of one colour at FPS_IN, a keyframe every second."""
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt = 320, 180, "yuv420p"
    enc.time_base = VIDEO_TIME_BASE
    enc.framerate = Fraction(FPS_IN)
    enc.bit_rate = 200_000
    enc.gop_size = FPS_IN
    enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    solid = VideoFrame(320, 180, "rgb24")
    solid.planes[0].update(bytes(rgb) * (solid.planes[0].buffer_size // 3))
    for i in range(round(seconds * FPS_IN)):
        frame = solid.reformat(format="yuv420p")
        frame.pts = i * (90000 // FPS_IN)
        frame.time_base = VIDEO_TIME_BASE
        for pkt in enc.encode(frame):
            assert pkt.pts is not None
            yield MediaPacket(bytes(pkt), pkt.pts, VIDEO_TIME_BASE, pkt.is_keyframe, "video")


def tone_opus(tone_hz: int, level: float, seconds: float) -> list[MediaPacket]:
    """Stereo Opus of a sine tone, 20 ms packets."""
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format = 48000, "stereo", "s16"
    enc.time_base = AUDIO_TIME_BASE
    # 20 ms holds a whole number of periods (tones are multiples of 50 Hz): one chunk repeats
    chunk = b"".join(
        int(level * 32767 * math.sin(2 * math.pi * tone_hz * n / 48000)).to_bytes(
            2, "little", signed=True
        )
        * 2
        for n in range(960)
    )
    data: list[bytes] = []
    for i in range(round(seconds * 50)):
        frame = AudioFrame(format="s16", layout="stereo", samples=960)
        frame.sample_rate = 48000
        frame.pts = i * 960
        frame.planes[0].update(chunk)
        data.extend(bytes(p) for p in enc.encode(frame))
    return [MediaPacket(d, n * 960, AUDIO_TIME_BASE, True, "audio") for n, d in enumerate(data)]


def write_track(
    manifest: Manifest,
    directory: Path,
    pid: str,
    kind: Kind,
    packets: Iterable[MediaPacket],
    offset: float = 0.0,
    key: DataKey | None = None,
) -> None:
    """One participant's camera or microphone track, starting ``offset`` s into the session.

    With ``key`` the segments are encrypted at rest (as the Recorder does with a keyring).
    """
    track_id = f"{pid}.{'camera' if kind == 'video' else 'microphone'}"

    def on_segment(info: SegmentInfo) -> None:
        manifest.segment(info)

    writer = TrackWriter(
        track_id,
        kind,
        directory,
        SESSION_START,
        SESSION_START + offset,
        segment_seconds=2.0,
        on_segment=on_segment,
        key=key,
    )
    first = True
    for packet in packets:
        assert writer.push(packet)
        if first:
            assert writer.offset_s is not None
            manifest.track_started(
                track_id,
                participant_id=pid,
                kind=kind,
                source="camera" if kind == "video" else "microphone",
                codec=writer.codec,
                offset_s=writer.offset_s,
            )
            first = False
    writer.close()
    manifest.track_ended(track_id)
