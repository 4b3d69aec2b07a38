"""Composite render speed on one core: a 4-party 360p session, target >= 4x real time.

    python -m bench.render_bench [--seconds 60] [--cpu 0] [--size 1280x720] [--fps 15]

The session is synthetic but shaped like a real one: each participant publishes
640x360 30 fps VP8 at ~400 kbit/s (FFmpeg's ``testsrc2`` with moving content,
a different hue each and temporal noise like a camera's) and 20 ms Opus packets
(a tone while it is their turn to talk, round robin, -55 dBFS hiss otherwise),
written with TrackWriter and Manifest as the Recorder does.  It is made once and
cached under the temp directory (about a minute on two cores).

The render then runs pinned to one CPU (``os.sched_setaffinity``) with
``threads=1``; the CPU time of each stage (``time.thread_time``, decode / scale /
compose / encode / audio) shows what dominates.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
from av import AudioFrame
from av.filter import Graph
from av.video.frame import VideoFrame

from media_server.packet import AUDIO_TIME_BASE, VIDEO_TIME_BASE, MediaPacket
from recording.composite import render_composite
from recording.manifest import Manifest
from recording.segments import Kind, SegmentInfo, TrackWriter

SOURCE_FPS = 30
SOURCE_SIZE = (640, 360)
SOURCE_BITRATE = 350_000  # libvpx overshoots on this noisy source: ~400 kbit/s
TURN_S = 5.0
SESSION_START = 1_000_000.0
PEOPLE = [
    ("p1", "Анна Смирнова", "ГБУЗ Областная больница №1"),
    ("p2", "Игорь Ким", "ФАП с. Верхнее"),
    ("p3", "Dr. Maria Lopez", "Federal Medical Centre"),
    ("p4", "Олег Васильев", "ЦРБ Заречного района"),
]


def _camera(index: int, seconds: float) -> Iterator[MediaPacket]:
    graph = Graph()
    chain = [
        graph.add("testsrc2", f"size={SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}:rate={SOURCE_FPS}"),
        graph.add("hue", f"h={index * 90}"),
        graph.add("noise", f"alls=8:allf=t+u:all_seed={index + 1}"),
        graph.add("format", "yuv420p"),
        graph.add("buffersink"),
    ]
    for a, b in itertools.pairwise(chain):
        a.link_to(b)
    graph.configure()
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt = *SOURCE_SIZE, "yuv420p"
    enc.time_base = VIDEO_TIME_BASE
    enc.framerate = Fraction(SOURCE_FPS)
    enc.bit_rate = SOURCE_BITRATE
    enc.gop_size = SOURCE_FPS * 10  # WebRTC: keyframes only when asked; one every 10 s here
    enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    for i in range(round(seconds * SOURCE_FPS)):
        frame = chain[-1].pull()
        assert isinstance(frame, VideoFrame)
        frame.pts = i * (90000 // SOURCE_FPS)
        frame.time_base = VIDEO_TIME_BASE
        frame.pict_type = av.video.frame.PictureType.NONE
        for pkt in enc.encode(frame):
            assert pkt.pts is not None
            yield MediaPacket(bytes(pkt), pkt.pts, VIDEO_TIME_BASE, pkt.is_keyframe, "video")


def _microphone(index: int, seconds: float) -> list[MediaPacket]:
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format = 48000, "stereo", "s16"
    enc.time_base = AUDIO_TIME_BASE
    enc.bit_rate = 32_000

    def chunk(level: float, hz: int) -> bytes:
        return b"".join(
            int(level * 32767 * math.sin(2 * math.pi * hz * n / 48000)).to_bytes(
                2, "little", signed=True
            )
            * 2
            for n in range(960)
        )

    talk, quiet = chunk(0.1, 200 + 100 * index), chunk(0.0018, 7000)
    packets: list[bytes] = []
    for i in range(round(seconds * 50)):
        turn = int(i / 50 / TURN_S) % len(PEOPLE)
        frame = AudioFrame(format="s16", layout="stereo", samples=960)
        frame.sample_rate, frame.pts = 48000, i * 960
        frame.planes[0].update(talk if turn == index else quiet)
        packets.extend(bytes(p) for p in enc.encode(frame))
    return [MediaPacket(d, n * 960, AUDIO_TIME_BASE, True, "audio") for n, d in enumerate(packets)]


def _record(
    manifest: Manifest, directory: Path, pid: str, kind: Kind, packets: Iterable[MediaPacket]
) -> None:
    track_id = f"{pid}.{'camera' if kind == 'video' else 'microphone'}"

    def on_segment(info: SegmentInfo) -> None:
        manifest.segment(info)

    writer = TrackWriter(
        track_id,
        kind,
        directory,
        SESSION_START,
        SESSION_START,
        on_segment=on_segment,
        max_queue=1_000_000,  # pushed faster than real time: never drop
    )
    manifest.track_started(
        track_id,
        participant_id=pid,
        kind=kind,
        source="camera" if kind == "video" else "microphone",
        codec=writer.codec,
        offset_s=0.0,
    )
    for packet in packets:
        assert writer.push(packet)
    writer.close()
    assert writer.stats.written == writer.stats.received, writer.stats
    manifest.track_ended(track_id, stats={"written": writer.stats.written})


def make_session(seconds: float, cache: Path) -> Path:
    """The cached recording directory (made on first use)."""
    directory = cache / f"session-{len(PEOPLE)}x{SOURCE_SIZE[1]}p-{seconds:g}s-v3"
    if (directory / "complete").exists():
        return directory
    if directory.exists():
        for path in sorted(directory.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    directory.mkdir(parents=True)
    print(f"making a {seconds:g} s {len(PEOPLE)}-party session in {directory} …", file=sys.stderr)
    with Manifest(directory) as manifest:
        manifest.recording_started(recording_id="bench", room="bench", consultation_id="bench")
        for index, (pid, name, clinic) in enumerate(PEOPLE):
            manifest.participant(pid, name=name, clinic=clinic, tier="lan", role="doctor")
            _record(manifest, directory, pid, "audio", _microphone(index, seconds))
            _record(manifest, directory, pid, "video", _camera(index, seconds))
        manifest.recording_stopped()
    (directory / "complete").write_text("ok\n")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: last)")
    parser.add_argument("--size", default="1280x720", help="output WxH (default 1280x720)")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "konsilium-bench"
    )
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    directory = make_session(args.seconds, args.cache)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    out = args.cache / f"composite-{width}x{height}-{args.fps}.webm"
    cpu_before = time.process_time()
    result = render_composite(directory, out, width=width, height=height, fps=args.fps, threads=1)
    cpu_total = time.process_time() - cpu_before
    source_kbps = sum(p.stat().st_size for p in directory.rglob("*.webm")) * 8 / args.seconds / 1e3
    out_kbps = out.stat().st_size * 8 / result.duration_s / 1e3
    verdict = "met" if result.speed_x >= 4 else "NOT met"
    w, h = SOURCE_SIZE
    lines = [
        f"session     {len(PEOPLE)} parties, {w}x{h} {SOURCE_FPS} fps VP8 + Opus, "
        f"{source_kbps:.0f} kbit/s in all",
        f"output      {width}x{height} {args.fps} fps VP8 + Opus, {out_kbps:.0f} kbit/s, {out}",
        f"duration    {result.duration_s:.1f} s, {result.frames} frames",
        f"wall time   {result.seconds_taken:.2f} s on CPU {cpu} (threads=1)",
        f"speed       {result.speed_x:.2f}x real time (target >= 4x: {verdict})",
        f"process CPU {cpu_total:.2f} s; by stage (CPU s, ms per session second, share):",
    ]
    for stage, seconds in sorted(result.stages.items(), key=lambda kv: -kv[1]):
        per_s = seconds / result.duration_s * 1e3
        lines.append(
            f"  {stage:<8} {seconds:6.2f} s  {per_s:6.1f} ms/s  {seconds / cpu_total:5.1%}"
        )
    other = cpu_total - sum(result.stages.values())
    lines.append(f"  {'other':<8} {other:6.2f} s  {other / result.duration_s * 1e3:6.1f} ms/s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append(f"peak RSS    {peak_mb:.0f} MB (the whole process)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
