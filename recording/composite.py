"""Composite render: one playable WebM (VP8 + Opus) of a recording, made offline.

Input is the recording directory as the Recorder leaves it: ``manifest.jsonl``
and the segment files it lists (only what the manifest lists is the record).
Output is a grid of every present participant, each tile labelled with name and
clinic, the active speaker framed in amber, and every audio track mixed.

Timeline: the session clock.  Output frame ``n`` shows time ``n / fps``; a
track's frame at track time ``p`` (segment files carry track time) plays at
``offset_s + p``, so late joiners and reconnects land where they happened.  Each
tile shows its track's latest frame not after the output time; a tile whose
latest frame is older than ``HOLD_S`` (video paused, camera off, not yet
started) shows a placeholder with the name instead of a frozen picture.

Presence: a participant has a tile while any of their camera or microphone
tracks plays, or between their ``join`` and ``leave`` events (``offset_s``),
with gaps under ``MERGE_GAP_S`` merged; a screen share has its own tile while it
plays.  Tiles keep the order in which they appeared; ``n`` tiles make a grid of
``ceil(sqrt(n))`` columns (1, 2x1, 2x2, 3x2, 3x3, 4x3 …), an incomplete last row
centred; each tile keeps the output's aspect ratio and each video its own.

Audio: each track is decoded (Opus), converted to 48 kHz stereo s16, placed at
``offset_s + pts`` (gaps become silence, overlaps are cut), and all tracks are
summed by FFmpeg's ``amix`` without normalisation (a lone speaker keeps his
level) followed by ``alimiter`` at -1 dBFS (a soft limit instead of clipping).
The active speaker is the participant with the highest mean-square energy over
the 0.5 s centred on the frame (audio is mixed 0.25 s ahead of the video),
above -45 dBFS; another participant takes over only when 1.4x louder.

Streaming: one segment file open per track at a time, one decoded frame held
per tile, at most a few audio packets buffered per track.  The output is written
to ``<out>.part`` and renamed when complete; an exception (also one raised by
the ``progress`` callback, to cancel) removes it.

Encryption at rest: segments and the manifest are read through
``recording.storage`` (decrypted when encrypted, with the ``keyring`` given);
with a keyring the composite itself is written encrypted with its active key
(``recording.storage.MediaOutput``: no plaintext reaches the disk).

Text and compositing use Pillow (planes pasted as 8-bit images, C speed); names
in Cyrillic need a TrueType font with it (DejaVu Sans, Debian
``fonts-dejavu-core``), else Pillow's built-in font is used (Latin only).
"""

from __future__ import annotations

import array
import logging
import math
import operator
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeAlias, cast

import av
from av.audio.codeccontext import AudioCodecContext
from av.audio.frame import AudioFrame
from av.audio.resampler import AudioResampler
from av.codec.context import CodecContext
from av.container import OutputContainer
from av.filter import Graph
from av.frame import Frame
from av.video.codeccontext import VideoCodecContext
from av.video.frame import VideoFrame
from PIL import Image, ImageDraw, ImageFont

from recording.keyring import Keyring
from recording.segments import RecordingError
from recording.storage import MediaOutput, open_media, read_entries

log = logging.getLogger(__name__)

RATE = 48000
CHUNK = 4800  # 100 ms of audio: the mixing and speaker-level step
WINDOW_CHUNKS = 5  # 0.5 s speaker window
OPUS_FRAME = 960  # 20 ms: what the encoder takes
AUDIO_TIME_BASE = Fraction(1, RATE)
HOLD_S = 1.0
MERGE_GAP_S = 1.0
SPEAKER_FLOOR = (32768 * 10 ** (-45 / 20)) ** 2
SPEAKER_SWITCH = 1.4
_JITTER = 240  # samples (5 ms) of timestamp jitter taken as contiguous audio
STAGES = ("decode", "scale", "compose", "encode", "audio")
Font: TypeAlias = ImageFont.FreeTypeFont | ImageFont.ImageFont
Op: TypeAlias = tuple[int, int, int, "int | Image.Image", "Image.Image | None"]


def _yuv(r: int, g: int, b: int) -> tuple[int, int, int]:
    """BT.601 limited range, as libvpx and swscale use by default."""
    return (
        round(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255),
        round(128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255),
        round(128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255),
    )


BACKGROUND = _yuv(12, 14, 18)
LETTERBOX = _yuv(0, 0, 0)
SLATE = _yuv(44, 52, 64)
HIGHLIGHT_RGB = (255, 191, 0)
HIGHLIGHT = _yuv(*HIGHLIGHT_RGB)
_FONT_FILES = {
    True: ("dejavu/DejaVuSans-Bold.ttf", "liberation/LiberationSans-Bold.ttf"),
    False: ("dejavu/DejaVuSans.ttf", "liberation/LiberationSans-Regular.ttf"),
}
_FONT_ROOTS = ("/usr/share/fonts/truetype", "/usr/share/fonts", "/usr/local/share/fonts")


class RenderError(RecordingError):
    """The recording cannot be rendered (no manifest, nothing recorded, bad arguments)."""


@dataclass(frozen=True, slots=True)
class RenderResult:
    duration_s: float
    frames: int
    out_path: Path
    seconds_taken: float
    speed_x: float  # duration_s / seconds_taken
    stages: dict[str, float] = field(default_factory=dict)  # this thread's CPU s per stage
    skipped_segments: tuple[str, ...] = ()  # unreadable segment files, rendered as gaps


# ---------------------------------------------------------------- plan


@dataclass(slots=True)
class _Track:
    track_id: str
    participant_id: str
    kind: str
    source: str
    offset_s: float
    segments: list[Path] = field(default_factory=list)
    end_s: float = 0.0
    keyring: Keyring | None = None


@dataclass(slots=True)
class _Slot:
    participant_id: str
    name: str
    clinic: str
    screen: bool
    intervals: list[tuple[float, float]]
    tracks: list[_Track]
    cursor: _VideoCursor | None = None
    scaled: tuple[VideoFrame, VideoFrame] | None = None  # (decoded, scaled for its tile)

    def present(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.intervals)


@dataclass(slots=True)
class _Plan:
    duration_s: float
    slots: list[_Slot]
    audio: list[_Track]


def _load_plan(directory: Path, keyring: Keyring | None) -> _Plan:
    try:
        entries = read_entries(directory, keyring)
    except FileNotFoundError as exc:
        raise RenderError(f"{directory}: no manifest") from exc
    except (ValueError, RecordingError) as exc:
        raise RenderError(f"{directory.name}: unreadable manifest: {exc}") from exc
    people: dict[str, tuple[str, str]] = {}
    tracks: dict[str, _Track] = {}
    segments: dict[str, dict[int, tuple[Path, float]]] = {}
    events: list[tuple[str, str, float]] = []
    root = directory.resolve()
    for entry in entries:
        data = entry.get("data")
        try:
            if isinstance(data, dict):
                _read_entry(str(entry.get("type")), data, root, people, tracks, segments, events)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: manifest entry %s skipped: %s", directory.name, entry.get("seq"), exc)
    media: list[_Track] = []
    for track in tracks.values():
        listed = segments.get(track.track_id, {})
        track.segments = [listed[i][0] for i in sorted(listed)]
        track.end_s = max((track.offset_s + end for _, end in listed.values()), default=0.0)
        track.keyring = keyring
        if track.segments:
            media.append(track)
    if not media:
        raise RenderError(f"{directory.name}: nothing to render, the manifest lists no segment")
    duration = max(t.end_s for t in media)
    slots = _make_slots(people, media, events, duration)
    return _Plan(duration, slots, [t for t in media if t.kind == "audio"])


def _read_entry(
    kind: str,
    data: dict[str, Any],
    root: Path,
    people: dict[str, tuple[str, str]],
    tracks: dict[str, _Track],
    segments: dict[str, dict[int, tuple[Path, float]]],
    events: list[tuple[str, str, float]],
) -> None:
    if kind == "participant":
        people[str(data["id"])] = (str(data.get("name") or data["id"]), str(data.get("clinic", "")))
    elif kind == "track_started":
        if data["kind"] not in ("audio", "video"):
            raise ValueError(f"track kind {data['kind']!r}")
        track_id = str(data["track_id"])
        tracks[track_id] = _Track(
            track_id,
            str(data["participant_id"]),
            str(data["kind"]),
            str(data.get("source", "")),
            float(data["offset_s"]),
        )
    elif kind == "segment":
        path = (root / str(data["path"])).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"segment path {data['path']!r} leaves the recording")
        end = float(data["start_pts_s"]) + float(data["duration_s"])
        segments.setdefault(str(data["track_id"]), {})[int(data["index"])] = (path, end)
    elif kind == "event" and data.get("kind") in ("join", "leave") and "offset_s" in data:
        events.append((str(data["participant_id"]), str(data["kind"]), float(data["offset_s"])))


def _make_slots(
    people: dict[str, tuple[str, str]],
    tracks: list[_Track],
    events: list[tuple[str, str, float]],
    duration: float,
) -> list[_Slot]:
    spans: dict[str, list[tuple[float, float]]] = {}
    for t in tracks:
        if t.source != "screen":
            spans.setdefault(t.participant_id, []).append((t.offset_s, t.end_s))
    joined: dict[str, float] = {}
    for pid, kind, at in events:
        if kind == "join":
            joined.setdefault(pid, at)
        elif pid in joined:
            spans.setdefault(pid, []).append((joined.pop(pid), at))
    for pid, at in joined.items():
        spans.setdefault(pid, []).append((at, duration))
    slots: list[_Slot] = []
    for pid in dict.fromkeys([*people, *(t.participant_id for t in tracks)]):
        name, clinic = people.get(pid, (pid, ""))
        mine = [t for t in tracks if t.participant_id == pid and t.kind == "video"]
        video = sorted(mine, key=lambda t: t.offset_s)
        cams = [t for t in video if t.source != "screen"]
        screens = [t for t in video if t.source == "screen"]
        slots.append(_Slot(pid, name, clinic, False, _merge(spans.get(pid, []), duration), cams))
        if screens:
            shared = _merge([(t.offset_s, t.end_s) for t in screens], duration)
            slots.append(_Slot(pid, name, clinic, True, shared, screens))
    slots = [s for s in slots if s.intervals]
    slots.sort(key=lambda s: s.intervals[0][0])  # stable: ties keep the manifest's order
    return slots


def _merge(spans: list[tuple[float, float]], duration: float) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted((max(0.0, a), min(duration, b)) for a, b in spans):
        if b <= a:
            continue
        if merged and a - merged[-1][1] < MERGE_GAP_S:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


# ---------------------------------------------------------------- decoding


class _Stages:
    def __init__(self) -> None:
        self.cpu = dict.fromkeys(STAGES, 0.0)

    def add(self, stage: str, since: float) -> float:
        now = time.thread_time()
        self.cpu[stage] += now - since
        return now


_Decoder: TypeAlias = VideoCodecContext | AudioCodecContext


def _decoder(stream: av.stream.Stream, threads: int) -> _Decoder:
    name = stream.codec_context.name
    if name == "opus" and "libopus" in av.codecs_available:
        name = "libopus"  # decodes to s16 stereo: no conversion needed
    ctx = CodecContext.create(name, "r")
    if not isinstance(ctx, VideoCodecContext | AudioCodecContext):
        raise RenderError(f"{stream.codec_context.name}: not an audio or video codec")
    ctx.extradata = stream.codec_context.extradata
    ctx.thread_count = threads
    if threads > 1:
        ctx.thread_type = "AUTO"
    return ctx


def _decode(track: _Track, threads: int, skipped: list[str]) -> _Frames:
    """(session time, frame) of one track, segments in index order, one file open at a time."""
    decoder: _Decoder | None = None
    for path in track.segments:
        try:
            source = open_media(path, track.keyring)
        except (OSError, RecordingError) as exc:
            log.warning("%s: segment %s unreadable: %s", track.track_id, path.name, exc)
            skipped.append(str(path))
            continue
        try:
            container = av.open(source, "r")
        except av.FFmpegError as exc:
            source.close()
            log.warning("%s: segment %s unreadable: %s", track.track_id, path.name, exc)
            skipped.append(str(path))
            continue
        with source, container:
            streams = container.streams.video if track.kind == "video" else container.streams.audio
            if not streams:
                skipped.append(str(path))
                continue
            if decoder is None:
                decoder = _decoder(streams[0], threads)
            time_base = float(streams[0].time_base or 0)
            try:
                for packet in container.demux(streams[0]):
                    if packet.size and packet.pts is not None:
                        yield from _decoded(decoder, packet, track.offset_s, time_base)
            except (av.FFmpegError, RecordingError) as exc:  # damaged: keep what was decoded
                log.warning("%s: segment %s damaged: %s", track.track_id, path.name, exc)
                skipped.append(str(path))
    if decoder is not None:
        yield from _decoded(decoder, None, track.offset_s, time_base)


def _decoded(
    decoder: _Decoder, packet: av.Packet[Any] | None, offset_s: float, time_base: float
) -> Iterator[tuple[float, Frame]]:
    """Session time and frame; every segment of a track has the same (Matroska) time base."""
    try:
        frames = decoder.decode(packet)
    except av.FFmpegError:
        return
    for frame in frames:
        if frame.pts is not None:
            yield offset_s + frame.pts * time_base, frame


_Frames: TypeAlias = Generator[tuple[float, Frame], None, None]


def _chain(tracks: list[_Track], threads: int, skipped: list[str]) -> _Frames:
    for track in tracks:
        yield from _decode(track, threads, skipped)


class _VideoCursor:
    """The latest decoded frame of a tile's tracks at a given session time."""

    def __init__(self, frames: _Frames, stages: _Stages) -> None:
        self._frames = frames
        self._stages = stages
        self._next: tuple[float, Frame] | None = None
        self._done = False
        self.current: tuple[float, VideoFrame] | None = None

    def at(self, t: float) -> tuple[float, VideoFrame] | None:
        while True:
            if self._next is None:
                if self._done:
                    break
                since = time.thread_time()
                self._next = next(self._frames, None)
                self._stages.add("decode", since)
                if self._next is None:
                    self._done = True
                    break
            if self._next[0] > t + 1e-3:
                break
            when, frame = self._next
            self._next = None
            if isinstance(frame, VideoFrame):
                self.current = (when, frame)
        return self.current

    def close(self) -> None:
        self._frames.close()


class _AudioReader:
    """One audio track as 48 kHz stereo s16 on the session's sample clock."""

    def __init__(self, track: _Track, threads: int, skipped: list[str]) -> None:
        self.participant_id = track.participant_id
        self.speech = track.source != "screen"
        self._frames = _decode(track, threads, skipped)
        self._resampler = AudioResampler(format="s16", layout="stereo", rate=RATE)
        self._pieces: deque[tuple[int, bytes]] = deque()  # (session sample, s16 stereo)
        self._end = round(track.offset_s * RATE)
        self._done = False

    def take(self, start: int, n: int) -> bytes | None:
        """Samples [start, start + n), or None when the track has none there."""
        end = start + n
        while not self._done and (
            not self._pieces or self._pieces[-1][0] + len(self._pieces[-1][1]) // 4 < end
        ):
            self._fill()
        out: bytearray | None = None
        for pos, data in self._pieces:
            a, b = max(start, pos), min(end, pos + len(data) // 4)
            if b > a:
                out = out if out is not None else bytearray(n * 4)
                out[(a - start) * 4 : (b - start) * 4] = data[(a - pos) * 4 : (b - pos) * 4]
        while self._pieces and self._pieces[0][0] + len(self._pieces[0][1]) // 4 <= end:
            self._pieces.popleft()
        return bytes(out) if out is not None else None

    def _fill(self) -> None:
        item = next(self._frames, None)
        if item is None:
            self._done = True
            return
        when, frame = item
        if not isinstance(frame, AudioFrame):
            return
        pos = round(when * RATE)
        native = frame.format.name == "s16" and frame.layout.name == "stereo"
        converted = [frame] if native and frame.sample_rate == RATE else None
        for out in converted or self._resampler.resample(frame):
            data = bytes(out.planes[0])[: out.samples * 4]
            if abs(pos - self._end) <= _JITTER:
                pos = self._end  # contiguous
            elif pos < self._end:  # overlaps what was placed: cut its head
                data = data[(self._end - pos) * 4 :]
                pos = self._end
            if data:
                self._pieces.append((pos, data))
                self._end = pos + len(data) // 4
            pos += out.samples

    def close(self) -> None:
        self._frames.close()


def _energy(chunk: bytes) -> float:
    """Mean square of the left channel, one sample in 8 (plenty for a level)."""
    samples = array.array("h")
    samples.frombytes(chunk)
    left = samples[::16]
    return float(sum(map(operator.mul, left, left))) / max(1, len(left))


def _s16_frame(data: bytes, samples: int) -> AudioFrame:
    frame = AudioFrame(format="s16", layout="stereo", samples=samples)
    plane = frame.planes[0]
    plane.update(data + bytes(plane.buffer_size - len(data)))
    frame.sample_rate = RATE
    frame.time_base = AUDIO_TIME_BASE
    return frame


class _Mixer:
    """amix (no normalisation) → alimiter (-1 dBFS) → s16 stereo, one input per track."""

    def __init__(self, inputs: int) -> None:
        graph = Graph()
        self._sources = [
            graph.add_abuffer(
                sample_rate=RATE, format="s16", layout="stereo", time_base=AUDIO_TIME_BASE
            )
            for _ in range(inputs)
        ]
        mix = graph.add("amix", f"inputs={inputs}:normalize=0")
        limit = graph.add("alimiter", "limit=0.891:level=0:latency=1")
        fmt = graph.add("aformat", f"sample_fmts=s16:channel_layouts=stereo:sample_rates={RATE}")
        self._sink = graph.add("abuffersink")
        for i, source in enumerate(self._sources):
            source.link_to(mix, 0, i)
        mix.link_to(limit)
        limit.link_to(fmt)
        fmt.link_to(self._sink)
        graph.configure()
        self._graph = graph  # filter contexts do not keep their graph alive
        self._silence = _s16_frame(b"", CHUNK)

    def push(self, chunks: list[bytes | None], pts: int, n: int) -> list[AudioFrame]:
        for source, chunk in zip(self._sources, chunks, strict=True):
            if chunk is None and n == CHUNK:
                frame = self._silence
            else:
                frame = _s16_frame(chunk or b"", n)
            frame.pts = pts
            source.push(frame)
        return self._pull()

    def flush(self) -> list[AudioFrame]:
        for source in self._sources:
            source.push(None)
        return self._pull()

    def _pull(self) -> list[AudioFrame]:
        frames: list[AudioFrame] = []
        while True:
            try:
                frame = self._sink.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return frames
            if isinstance(frame, AudioFrame):
                frames.append(frame)


class _Speakers:
    def __init__(self, participants: list[str]) -> None:
        self._levels = {p: deque([0.0] * WINDOW_CHUNKS, WINDOW_CHUNKS) for p in participants}
        self.current: str | None = None

    def add(self, energies: dict[str, float]) -> None:
        for pid, window in self._levels.items():
            window.append(energies.get(pid, 0.0))

    def active(self) -> str | None:
        levels = {pid: sum(w) / WINDOW_CHUNKS for pid, w in self._levels.items()}
        best = max(levels, key=levels.__getitem__, default=None)
        if best is None or levels[best] < SPEAKER_FLOOR:
            self.current = None
        elif self.current is None or levels[best] > SPEAKER_SWITCH * levels[self.current]:
            self.current = best
        return self.current


class _AudioPath:
    """Readers → speaker levels → mixer → Opus encoder, chunk by chunk."""

    def __init__(
        self,
        plan: _Plan,
        container: OutputContainer,
        threads: int,
        stages: _Stages,
        skipped: list[str],
    ) -> None:
        self._readers = [_AudioReader(t, threads, skipped) for t in plan.audio]
        self._mixer = _Mixer(max(1, len(self._readers)))
        self.speakers = _Speakers(list(dict.fromkeys(s.participant_id for s in plan.slots)))
        self._stream = container.add_stream(
            "libopus",
            rate=RATE,
            layout="stereo",
            format="s16",
            options={"compression_level": "5"},  # 40 % faster than 10, same for speech
        )
        self._stream.bit_rate = 64_000
        self._container = container
        self._fifo = av.AudioFifo()
        self._stages = stages
        self._encoded = 0
        self.position = 0

    def advance(self, until: int, total: int) -> None:
        since = time.thread_time()
        while self.position < min(until, total):
            n = min(CHUNK, total - self.position)
            chunks = [r.take(self.position, n) for r in self._readers] or [None]
            energies: dict[str, float] = {}
            for reader, chunk in zip(self._readers, chunks, strict=False):
                if chunk is not None and reader.speech:
                    pid = reader.participant_id
                    energies[pid] = energies.get(pid, 0.0) + _energy(chunk)
            self.speakers.add(energies)
            self._encode(self._mixer.push(chunks, self.position, n))
            self.position += n
        self._stages.add("audio", since)

    def finish(self, total: int) -> None:
        self.advance(total, total)
        since = time.thread_time()
        self._encode(self._mixer.flush())
        while frame := self._fifo.read(OPUS_FRAME, partial=True):
            self._put(frame)
        self._container.mux(self._stream.encode(None))
        self._stages.add("audio", since)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def _encode(self, frames: list[AudioFrame]) -> None:
        for frame in frames:
            frame.pts = None
            self._fifo.write(frame)
        while self._fifo.samples >= OPUS_FRAME:
            chunk = self._fifo.read(OPUS_FRAME)
            if chunk is not None:
                self._put(chunk)

    def _put(self, frame: AudioFrame) -> None:
        frame.pts = self._encoded
        frame.time_base = AUDIO_TIME_BASE
        self._encoded += frame.samples
        self._container.mux(self._stream.encode(frame))


# ---------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int


def _even(v: float) -> int:
    return max(2, int(v) // 2 * 2)


def _fit(sw: int, sh: int, bw: int, bh: int) -> tuple[int, int]:
    scale = min(bw / sw, bh / sh)
    return min(bw, _even(sw * scale + 0.5)), min(bh, _even(sh * scale + 0.5))


def grid_shape(n: int) -> tuple[int, int]:
    """(columns, rows): 1 → 1x1, 2 → 2x1, 3-4 → 2x2, 5-6 → 3x2, 7-9 → 3x3, 10-12 → 4x3."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return cols, max(1, math.ceil(n / cols))


def tile_rects(n: int, width: int, height: int) -> list[Rect]:
    """Each tile's picture area (the output's aspect ratio), the last row centred."""
    cols, rows = grid_shape(n)
    cw, ch = width // cols, height // rows
    fw, fh = _fit(width, height, cw, ch)
    rects = []
    for i in range(n):
        row, col = divmod(i, cols)
        in_row = min(cols, n - row * cols)
        x = (width - in_row * cw) // 2 + col * cw + (cw - fw) // 2
        y = (height - rows * ch) // 2 + row * ch + (ch - fh) // 2
        rects.append(Rect(x // 2 * 2, y // 2 * 2, fw, fh))
    return rects


# ---------------------------------------------------------------- painting


class _Fonts:
    def __init__(self) -> None:
        self._paths = {bold: _find_font(names) for bold, names in _FONT_FILES.items()}
        self._cache: dict[tuple[int, bool], Font] = {}
        if self._paths[False] is None:
            log.warning("no DejaVu/Liberation font: labels use Pillow's font (Latin only)")

    def get(self, size: int, bold: bool = False) -> Font:
        font = self._cache.get((size, bold))
        if font is None:
            path = self._paths[bold] or self._paths[False]
            font = ImageFont.truetype(path, size) if path else ImageFont.load_default(size)
            self._cache[(size, bold)] = font
        return font


def _find_font(names: tuple[str, ...]) -> str | None:
    for name in names:
        for root in _FONT_ROOTS:
            if os.path.isfile(candidate := os.path.join(root, name)):
                return candidate
    return None


def _frame_width(tile_height: int) -> int:
    """Width of the active speaker's frame."""
    return _even(tile_height / 40)


def _ellipsize(text: str, font: Font, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


class _Painter:
    """A yuv420p canvas as three Pillow "L" images (rows padded to the frame's line size)."""

    def __init__(self, width: int, height: int) -> None:
        template = VideoFrame(width, height, "yuv420p")
        self._planes = [
            Image.new("L", (p.line_size, p.height), BACKGROUND[i])
            for i, p in enumerate(template.planes)
        ]
        self.width, self.height = width, height
        self._fonts = _Fonts()
        self._overlays: dict[tuple[Any, ...], list[Op]] = {}

    def clear(self) -> None:
        for image, value in zip(self._planes, BACKGROUND, strict=True):
            image.paste(value, (0, 0, *image.size))

    def fill(self, rect: Rect, colour: tuple[int, int, int]) -> None:
        for i, (image, value) in enumerate(zip(self._planes, colour, strict=True)):
            s = 1 if i else 0
            box = (rect.x >> s, rect.y >> s, (rect.x + rect.w) >> s, (rect.y + rect.h) >> s)
            image.paste(value, box)

    def border(self, rect: Rect, colour: tuple[int, int, int], width: int) -> None:
        x, y, w, h = rect.x, rect.y, rect.w, rect.h
        self.fill(Rect(x, y, w, width), colour)
        self.fill(Rect(x, y + h - width, w, width), colour)
        self.fill(Rect(x, y, width, h), colour)
        self.fill(Rect(x + w - width, y, width, h), colour)

    def video(self, frame: VideoFrame, x: int, y: int) -> None:
        for i, plane in enumerate(frame.planes[:3]):
            s = 1 if i else 0
            size = (plane.width, plane.height)
            data = cast(bytes, memoryview(plane))  # Pillow reads any buffer, without a copy
            image = Image.frombuffer("L", size, data, "raw", "L", plane.line_size, 1)
            self._planes[i].paste(image, (x >> s, y >> s))

    def overlay(self, ops: list[Op], rect: Rect) -> None:
        for plane, dx, dy, src, mask in ops:
            s = 1 if plane else 0
            x, y = (rect.x >> s) + dx, (rect.y >> s) + dy
            if mask is None:
                assert isinstance(src, Image.Image)
                self._planes[plane].paste(src, (x, y))
            else:
                self._planes[plane].paste(src, (x, y, x + mask.width, y + mask.height), mask)

    def cached(self, key: tuple[Any, ...], build: Callable[[], list[Op]]) -> list[Op]:
        ops = self._overlays.get(key)
        if ops is None:
            if len(self._overlays) > 256:
                self._overlays.clear()
            ops = self._overlays[key] = build()
        return ops

    def label_ops(self, name: str, clinic: str, w: int, h: int) -> list[Op]:
        """A darkened strip at the bottom with the name (bold) and the clinic.

        The text keeps clear of the speaker frame (``_frame_width``) drawn over the edges.
        """
        sizes = [max(9, h // 15), max(8, h // 20)][: 2 if clinic else 1]
        lines = [(name, self._fonts.get(sizes[0], True)), (clinic, self._fonts.get(sizes[-1]))]
        inset, pad = _frame_width(h), max(2, h // 60)
        strip = _even(inset + 2 * pad + sum(int(size * 1.2) for size in sizes) + 1)
        mask = Image.new("L", (w, strip), 0)
        draw = ImageDraw.Draw(mask)
        y = pad
        for (text, font), size in zip(lines, sizes, strict=False):
            text = _ellipsize(text, font, w - 2 * (inset + pad))
            draw.text((inset + pad, y), text, fill=255, font=font)
            y += int(size * 1.2)
        return _text_ops(mask, 0, h - strip, Image.new("L", (w, strip), 150), 235)

    def placeholder_ops(self, name: str, clinic: str, note: str, w: int, h: int) -> list[Op]:
        """The tile without video: slate, the name, the clinic and why there is no picture."""
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        y = h // 2 - h // 7
        for text, size, fill in ((name, h // 9, 255), (clinic, h // 14, 220), (note, h // 16, 150)):
            font = self._fonts.get(max(8, size), bold=size == h // 9)
            text = _ellipsize(text, font, w - 8)
            draw.text(((w - font.getlength(text)) / 2, y), text, fill=fill, font=font)
            y += int(max(8, size) * 1.5)
        ops: list[Op] = [
            (i, 0, 0, Image.new("L", (w >> (i > 0), h >> (i > 0)), SLATE[i]), None)
            for i in range(3)
        ]
        return ops + _text_ops(mask, 0, 0, None, 235)

    def frame(self) -> VideoFrame:
        frame = VideoFrame(self.width, self.height, "yuv420p")
        for plane, image in zip(frame.planes, self._planes, strict=True):
            plane.update(image.tobytes())
        return frame


def _text_ops(mask: Image.Image, dx: int, dy: int, dim: Image.Image | None, white: int) -> list[Op]:
    """Pastes of white text (and a darkened box under it) onto Y, U and V."""
    half = mask.resize((mask.width // 2, mask.height // 2), Image.Resampling.BILINEAR)
    ops: list[Op] = []
    if dim is not None:
        dim_half = dim.resize(half.size)
        ops += [(0, dx, dy, 16, dim), (1, dx // 2, dy // 2, 128, dim_half)]
        ops += [(2, dx // 2, dy // 2, 128, dim_half)]
    ops += [(0, dx, dy, white, mask), (1, dx // 2, dy // 2, 128, half)]
    return [*ops, (2, dx // 2, dy // 2, 128, half)]


# ---------------------------------------------------------------- video path


class _VideoPath:
    def __init__(
        self,
        plan: _Plan,
        container: OutputContainer,
        size: tuple[int, int],
        fps: int,
        threads: int,
        stages: _Stages,
        skipped: list[str],
    ) -> None:
        width, height = size
        self._slots = plan.slots
        for slot in self._slots:
            if slot.tracks:
                frames = _chain(slot.tracks, threads, skipped)
                slot.cursor = _VideoCursor(frames, stages)
        self._stream = container.add_stream(
            "libvpx",
            rate=fps,
            options={
                "deadline": "realtime",
                "cpu-used": "16",  # libvpx's fastest VP8 mode
                "lag-in-frames": "0",
                # copy macroblocks that changed by under ~2 levels a pixel (SAD < 500):
                # invisible, and ~15 % less encoding time
                "static-thresh": "500",
            },
        )
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.bit_rate = max(200_000, int(width * height * fps * 0.08))
        self._stream.codec_context.gop_size = fps * 4
        self._stream.codec_context.thread_count = threads
        self._container = container
        self._painter = _Painter(width, height)
        self._fps = fps
        self._stages = stages
        self._layout: tuple[int, ...] = ()

    def render(self, n: int, speaker: str | None) -> None:
        t = n / self._fps
        cpu = self._stages.cpu
        since, inner = time.thread_time(), cpu["decode"] + cpu["scale"]
        present = [s for s in self._slots if s.present(t)]
        rects = tile_rects(len(present), self._painter.width, self._painter.height)
        layout = tuple(id(s) for s in present)
        if layout != self._layout:
            self._painter.clear()
            self._layout = layout
        for slot, rect in zip(present, rects, strict=True):
            self._draw(slot, rect, t, speaker == slot.participant_id and not slot.screen)
        frame = self._painter.frame()
        frame.pts = n
        frame.time_base = Fraction(1, self._fps)
        now = time.thread_time()
        cpu["compose"] += now - since - (cpu["decode"] + cpu["scale"] - inner)
        self._container.mux(self._stream.encode(frame))
        self._stages.add("encode", now)

    def _draw(self, slot: _Slot, rect: Rect, t: float, speaking: bool) -> None:
        painter = self._painter
        shown = slot.cursor.at(t) if slot.cursor is not None else None
        name = f"{slot.name} — screen" if slot.screen else slot.name
        if shown is not None and t - shown[0] <= HOLD_S:
            scaled = self._scaled(slot, shown[1], rect)
            if (scaled.width, scaled.height) != (rect.w, rect.h):
                painter.fill(rect, LETTERBOX)
            x = rect.x + (rect.w - scaled.width) // 2 // 2 * 2
            y = rect.y + (rect.h - scaled.height) // 2 // 2 * 2
            painter.video(scaled, x, y)
            key: tuple[Any, ...] = ("label", name, slot.clinic, rect.w, rect.h)
            ops = painter.cached(key, lambda: painter.label_ops(name, slot.clinic, rect.w, rect.h))
        else:
            note = "video paused" if shown is not None else "no video"
            key = ("placeholder", name, slot.clinic, note, rect.w, rect.h)
            ops = painter.cached(
                key, lambda: painter.placeholder_ops(name, slot.clinic, note, rect.w, rect.h)
            )
        painter.overlay(ops, rect)
        if speaking:
            painter.border(rect, HIGHLIGHT, _frame_width(rect.h))

    def _scaled(self, slot: _Slot, frame: VideoFrame, rect: Rect) -> VideoFrame:
        w, h = _fit(frame.width, frame.height, rect.w, rect.h)
        if slot.scaled is not None and slot.scaled[0] is frame:
            cached = slot.scaled[1]
            if (cached.width, cached.height) == (w, h):
                return cached
        since = time.thread_time()
        interpolation = "AREA" if w * 1.5 < frame.width else "BILINEAR"
        scaled = frame.reformat(w, h, "yuv420p", interpolation=interpolation)
        slot.scaled = (frame, scaled)
        self._stages.add("scale", since)
        return scaled

    def finish(self) -> None:
        since = time.thread_time()
        self._container.mux(self._stream.encode(None))
        self._stages.add("encode", since)

    def close(self) -> None:
        for slot in self._slots:
            if slot.cursor is not None:
                slot.cursor.close()
            slot.cursor, slot.scaled = None, None


# ---------------------------------------------------------------- entry point


def _check_arguments(width: int, height: int, fps: int, threads: int) -> None:
    if width < 64 or height < 64 or width % 2 or height % 2 or max(width, height) > 7680:
        raise RenderError(f"output size {width}x{height}: even, 64x64 to 7680x7680")
    if not 1 <= fps <= 60 or not 1 <= threads <= 64:
        raise RenderError(f"fps {fps} (1..60) or threads {threads} (1..64) out of range")


def render_composite(
    recording_dir: Path,
    out_path: Path,
    *,
    width: int = 1280,
    height: int = 720,
    fps: int = 15,
    progress: Callable[[float], None] | None = None,
    threads: int = 1,
    keyring: Keyring | None = None,
) -> RenderResult:
    """Render ``recording_dir`` into one WebM at ``out_path``; see the module docstring.

    ``progress(fraction)`` is called at least every 1 % and with 1.0 once the file is
    complete; an exception it raises cancels the render.  ``threads`` is given to
    every decoder and the encoder (1: the render uses one core).  ``keyring``
    decrypts the recording and, when given, encrypts the composite with its active key.
    """
    _check_arguments(width, height, fps, threads)
    started = time.perf_counter()
    recording_dir, out_path = Path(recording_dir), Path(out_path)
    plan = _load_plan(recording_dir, keyring)
    frames = max(1, math.ceil(plan.duration_s * fps - 1e-6))
    samples = round(frames * RATE / fps)
    stages = _Stages()
    skipped: list[str] = []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part = out_path.with_name(out_path.name + ".part")
    log.info("%s: rendering %.1f s, %d tiles", recording_dir.name, plan.duration_s, len(plan.slots))
    video: _VideoPath | None = None
    audio: _AudioPath | None = None
    output = MediaOutput(part, keyring)
    try:
        with av.open(output.target, "w", format="webm") as container:
            video = _VideoPath(plan, container, (width, height), fps, threads, stages, skipped)
            audio = _AudioPath(plan, container, threads, stages, skipped)
            reported = 0.0
            for n in range(frames):
                ahead = round((n / fps + WINDOW_CHUNKS * CHUNK / RATE / 2) * RATE)
                audio.advance(ahead, samples)
                video.render(n, audio.speakers.active())
                if progress is not None and (n + 1) / frames - reported >= 0.01:
                    reported = (n + 1) / frames
                    progress(min(reported, 0.999))  # 1.0 once the file is complete
            audio.finish(samples)
            video.finish()
        output.finish()
        os.replace(part, out_path)
    except BaseException:
        output.discard()
        part.unlink(missing_ok=True)
        raise
    finally:
        for path in (video, audio):
            if path is not None:
                path.close()
    if progress is not None:
        progress(1.0)
    taken = time.perf_counter() - started
    duration = frames / fps
    return RenderResult(
        duration_s=duration,
        frames=frames,
        out_path=out_path,
        seconds_taken=taken,
        speed_x=duration / taken if taken > 0 else math.inf,
        stages=dict(stages.cpu),
        skipped_segments=tuple(skipped),
    )
