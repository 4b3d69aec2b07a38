"""A pre-encoded test clip (VP8 + Opus) that load-test bots replay as packets.

A dozen bots on one small machine cannot afford to encode video at run time,
so each one replays the same short clip: a list of :class:`MediaPacket` that it
sends in a loop, restarting at frame 0 (always a keyframe) and shifting the
timestamps by :attr:`Clip.video_loop_pts` / :attr:`Clip.audio_loop_pts` on every
lap.

The picture is a test card drawn without numpy (bytes slicing and
``bytes.translate``): 75 % colour bars with a light camera-like grain, a static
zone plate underneath, a white box that circles the frame once per loop and the
frame number in the top-left corner.  The grain is what makes libvpx spend its
target bitrate; the zone plate gives keyframes some realistic weight.  The
sound is a 440 Hz tone with a slow amplitude swell; both tone and swell complete
a whole number of periods per loop.

Both encoders are warmed up on the end of the loop before the kept packets
start, so rate control is settled from frame 0 on and Opus's inter-frame state
at the loop point matches what follows the last packet: replaying the packets
in a loop is seamless.

The clip is encoded once per parameter set and cached as a WebM file (written
to a temporary name and renamed, under a lock so parallel bots encode it once);
later calls demux that file and check it against a SHA-256 digest of the packets
stored in the file's tags.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import random
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.video.frame

from .packet import AUDIO_TIME_BASE, VIDEO_TIME_BASE, MediaPacket, is_vp8_keyframe

logger = logging.getLogger(__name__)

AUDIO_RATE = 48000
AUDIO_FRAME_SAMPLES = 960  # 20 ms
AUDIO_BITRATE = 32_000
AUDIO_LAYOUT = "stereo"  # what aiortc's own Opus encoder sends (opus/48000/2)
AUDIO_WARMUP_FRAMES = 50  # 1 s: libopus settles its mode (tone -> CELT) before the kept packets
VIDEO_WARMUP_S = 1.0
TONE_HZ = 440.0
SWELL_HZ = 0.5
DIGEST_TAG = "KONSILIUM_CLIP_SHA256"

# 75 % colour bars, BT.601 studio range (Y, U, V)
_BARS = (
    (180, 128, 128),  # white
    (162, 44, 142),  # yellow
    (131, 156, 44),  # cyan
    (112, 72, 58),  # green
    (84, 184, 198),  # magenta
    (65, 100, 212),  # red
    (35, 212, 114),  # blue
)
# 3x5 bitmap digits, one string of 15 cells per digit, row by row
_FONT = (
    "111101101101111",
    "010110010010111",
    "111001111100111",
    "111001111001111",
    "101101111001001",
    "111100111001111",
    "111100111101111",
    "111001001001001",
    "111101111101111",
    "111101111001111",
)


@dataclass(frozen=True)
class Clip:
    """A loopable VP8 + Opus clip as packets, ready to replay."""

    video: tuple[MediaPacket, ...]
    audio: tuple[MediaPacket, ...]
    width: int
    height: int
    fps: int
    duration_s: float
    keyframe_indices: tuple[int, ...]
    video_bitrate: int  # measured average, bits/s

    @property
    def video_loop_pts(self) -> int:
        """Add this to every video pts on each further lap (90 kHz clock)."""
        return _video_pts(len(self.video), self.fps)

    @property
    def audio_loop_pts(self) -> int:
        """Add this to every audio pts on each further lap (48 kHz clock)."""
        return len(self.audio) * AUDIO_FRAME_SAMPLES


@dataclass(frozen=True)
class _Params:
    width: int
    height: int
    fps: int
    bitrate: int
    seconds: float
    keyframe_interval: int

    @property
    def video_frames(self) -> int:
        return round(self.seconds * self.fps)

    @property
    def audio_frames(self) -> int:
        return round(self.seconds * AUDIO_RATE / AUDIO_FRAME_SAMPLES)

    @property
    def keyframes(self) -> tuple[int, ...]:
        return tuple(range(0, self.video_frames, self.keyframe_interval))

    @property
    def file_name(self) -> str:
        p = self
        return (
            f"clip-{p.width}x{p.height}-{p.fps}-{p.bitrate}-{p.seconds}-{p.keyframe_interval}.webm"
        )


class ClipCacheError(Exception):
    """The cached file is unreadable or does not hold what was written."""


def default_cache_dir() -> Path:
    base = os.environ.get("KONSILIUM_CLIP_CACHE", tempfile.gettempdir())
    return Path(base) / "konsilium-clips"


def load_clip(
    cache_dir: Path | None = None,
    *,
    width: int = 640,
    height: int = 360,
    fps: int = 30,
    bitrate: int = 500_000,
    seconds: float = 4.0,
    keyframe_interval: int = 60,
) -> Clip:
    """Return the clip for these settings, from the cache or freshly encoded."""
    params = _Params(width, height, fps, bitrate, float(seconds), keyframe_interval)
    _validate(params)
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / params.file_name

    clip = _try_read(path, params, warn=False)
    if clip is not None:
        return clip
    with _locked(path.with_name(path.name + ".lock")):
        clip = _try_read(path, params, warn=True)  # another process may have written it
        if clip is not None:
            return clip
        started = time.perf_counter()
        video, audio = encode_clip(width, height, fps, bitrate, params.seconds, keyframe_interval)
        _write_webm(path, params, video, audio)
        logger.info(
            "clip %s encoded and cached in %.2f s", path.name, time.perf_counter() - started
        )
    return _make_clip(params, video, audio)


def decode_check(clip: Clip) -> int:
    """Decode every video packet with libvpx; return the number of pictures decoded.

    Raises ``ValueError`` if a picture does not have the clip's size.
    """
    codec = av.CodecContext.create("libvpx", "r")
    count = 0
    for media in clip.video:
        packet = av.Packet(media.data)
        packet.pts = media.pts
        packet.time_base = media.time_base
        for frame in codec.decode(packet):
            if (frame.width, frame.height) != (clip.width, clip.height):
                raise ValueError(
                    f"decoded {frame.width}x{frame.height}, expected {clip.width}x{clip.height}"
                )
            count += 1
    count += len(codec.decode(None))
    return count


# --- encoding ---------------------------------------------------------------


def encode_clip(
    width: int, height: int, fps: int, bitrate: int, seconds: float, keyframe_interval: int
) -> tuple[tuple[MediaPacket, ...], tuple[MediaPacket, ...]]:
    """Encode the test card and tone; return (video packets, audio packets)."""
    params = _Params(width, height, fps, bitrate, float(seconds), keyframe_interval)
    _validate(params)
    return _encode_video(params), _encode_audio(params)


def _encode_video(p: _Params) -> tuple[MediaPacket, ...]:
    codec = av.CodecContext.create("libvpx", "w")
    codec.width = p.width
    codec.height = p.height
    codec.pix_fmt = "yuv420p"
    codec.time_base = Fraction(1, p.fps)
    codec.framerate = Fraction(p.fps)
    codec.bit_rate = p.bitrate
    codec.gop_size = 1 << 20  # no automatic keyframes: we place them ourselves
    codec.qmin = 4
    codec.qmax = 48
    codec.thread_count = 1
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "8",
        "lag-in-frames": "0",
        "error-resilient": "1",
        # minrate == maxrate == bit_rate selects CBR, as a WebRTC sender does
        "minrate": str(p.bitrate),
        "maxrate": str(p.bitrate),
        "bufsize": str(p.bitrate),
        "undershoot-pct": "50",
        "overshoot-pct": "50",
    }
    card = _TestCard(p.width, p.height, p.video_frames)
    n = p.video_frames
    warmup = min(n, round(VIDEO_WARMUP_S * p.fps))
    keyframes = set(p.keyframes)
    packets: list[MediaPacket] = []
    for i in range(-warmup, n):
        frame = card.frame(i % n)
        frame.pts = i + warmup
        if i >= 0 and i in keyframes:
            frame.pict_type = av.video.frame.PictureType.I
        encoded = codec.encode(frame)
        if i < 0:
            continue
        if len(encoded) != 1:
            raise RuntimeError(f"libvpx returned {len(encoded)} packets for frame {i}")
        data = bytes(encoded[0])
        packets.append(
            MediaPacket(data, _video_pts(i, p.fps), VIDEO_TIME_BASE, is_vp8_keyframe(data), "video")
        )
    codec.encode(None)
    return tuple(packets)


def _encode_audio(p: _Params) -> tuple[MediaPacket, ...]:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = AUDIO_RATE
    codec.layout = AUDIO_LAYOUT
    codec.format = "s16"
    codec.bit_rate = AUDIO_BITRATE
    codec.time_base = AUDIO_TIME_BASE
    codec.options = {"application": "audio", "frame_duration": "20", "vbr": "constrained"}
    n = p.audio_frames
    tone = _Tone(n)
    encoded: list[bytes] = []
    for k in range(AUDIO_WARMUP_FRAMES + n):
        frame = av.AudioFrame(format="s16", layout=AUDIO_LAYOUT, samples=AUDIO_FRAME_SAMPLES)
        frame.sample_rate = AUDIO_RATE
        frame.time_base = AUDIO_TIME_BASE
        frame.pts = k * AUDIO_FRAME_SAMPLES
        frame.planes[0].update(tone.stereo_s16((k - AUDIO_WARMUP_FRAMES) % n))
        encoded.extend(bytes(packet) for packet in codec.encode(frame))
    encoded.extend(bytes(packet) for packet in codec.encode(None))
    kept = encoded[AUDIO_WARMUP_FRAMES : AUDIO_WARMUP_FRAMES + n]
    if len(kept) != n:
        raise RuntimeError(f"libopus returned {len(encoded)} packets for {n} frames")
    return tuple(
        MediaPacket(data, j * AUDIO_FRAME_SAMPLES, AUDIO_TIME_BASE, True, "audio")
        for j, data in enumerate(kept)
    )


class _Tone:
    """A tone and a slow swell that both complete whole periods over the loop."""

    def __init__(self, frames: int) -> None:
        loop_s = frames * AUDIO_FRAME_SAMPLES / AUDIO_RATE
        self._tone = 2 * math.pi * max(1, round(TONE_HZ * loop_s)) / loop_s / AUDIO_RATE
        self._swell = 2 * math.pi * max(1, round(SWELL_HZ * loop_s)) / loop_s / AUDIO_RATE

    def stereo_s16(self, index: int) -> bytes:
        start = index * AUDIO_FRAME_SAMPLES
        mono = array("h", bytes(2 * AUDIO_FRAME_SAMPLES))
        for i in range(AUDIO_FRAME_SAMPLES):
            n = start + i
            gain = 0.25 * (0.7 + 0.3 * math.sin(self._swell * n))
            mono[i] = round(32767 * gain * math.sin(self._tone * n))
        stereo = array("h", bytes(4 * AUDIO_FRAME_SAMPLES))
        stereo[0::2] = mono
        stereo[1::2] = mono
        return stereo.tobytes()


class _TestCard:
    """Draws frame ``i`` of ``frames`` as a yuv420p VideoFrame, with bytes ops only."""

    GRAIN = 4  # luma grain amplitude on the bars, +-levels

    def __init__(self, width: int, height: int, frames: int) -> None:
        self.w, self.h, self.frames = width, height, frames
        self.bars_h = (height * 2 // 3) & ~1
        self.edges = [(round(k * width / 7)) & ~1 for k in range(8)]
        self.edges[-1] = width
        self.span = width * 64  # room for random offsets into the grain buffer
        self.grain = random.Random(1).randbytes(width * self.bars_h + self.span)
        amp = self.GRAIN
        self.tables = [
            bytes(min(235, max(16, y + b % (2 * amp + 1) - amp)) for b in range(256))
            for y, _, _ in _BARS
        ]
        self.zone = [self._zone_row(r) for r in range(height - self.bars_h)]
        cw = width // 2
        self.u_bars = b"".join(
            bytes([u]) * ((self.edges[k + 1] - self.edges[k]) // 2)
            for k, (_, u, _) in enumerate(_BARS)
        ).ljust(cw, b"\x80")
        self.v_bars = b"".join(
            bytes([v]) * ((self.edges[k + 1] - self.edges[k]) // 2)
            for k, (_, _, v) in enumerate(_BARS)
        ).ljust(cw, b"\x80")
        self.box = max(2, (height // 6) & ~1)
        self.scale = max(1, height // 45)

    def _zone_row(self, r: int) -> bytes:
        rows = self.h - self.bars_h
        y = r - rows / 2
        k = math.pi / (4.0 * self.w)
        return bytes(
            round(126 + 90 * math.cos(k * ((x - self.w / 2) ** 2 + 4 * y * y)))
            for x in range(self.w)
        )

    def frame(self, i: int) -> av.VideoFrame:
        luma = self._bars_luma(i) + self.zone
        chroma_rows = self.h // 2
        u = [self.u_bars] * (self.bars_h // 2) + [b"\x80" * (self.w // 2)] * (
            chroma_rows - self.bars_h // 2
        )
        v = [self.v_bars] * (self.bars_h // 2) + [b"\x80" * (self.w // 2)] * (
            chroma_rows - self.bars_h // 2
        )
        self._draw_box(i, luma, u, v)
        self._draw_number(i, luma, u, v)
        frame = av.VideoFrame(self.w, self.h, "yuv420p")
        for plane, rows in zip(frame.planes, (luma, u, v), strict=True):
            plane.update(_pack(rows, plane.line_size, plane.height))
        return frame

    def _bars_luma(self, i: int) -> list[bytes]:
        offset = random.Random(i).randrange(self.span)
        grain, edges, tables = self.grain, self.edges, self.tables
        rows = []
        for r in range(self.bars_h):
            base = offset + r * self.w
            rows.append(
                b"".join(
                    grain[base + edges[k] : base + edges[k + 1]].translate(tables[k])
                    for k in range(7)
                )
            )
        return rows

    def _draw_box(self, i: int, luma: list[bytes], u: list[bytes], v: list[bytes]) -> None:
        s = self.box
        angle = 2 * math.pi * i / self.frames
        x0 = round((self.w - s) / 2 * (1 + 0.8 * math.cos(angle))) & ~1
        y0 = round((self.h - s) / 2 * (1 + 0.8 * math.sin(angle))) & ~1
        _fill(luma, x0, y0, s, s, 235)
        _fill(u, x0 // 2, y0 // 2, s // 2, s // 2, 128)
        _fill(v, x0 // 2, y0 // 2, s // 2, s // 2, 128)
        inner = s // 4 & ~1
        _fill(luma, x0 + inner, y0 + inner, s - 2 * inner, s - 2 * inner, 16)

    def _draw_number(self, i: int, luma: list[bytes], u: list[bytes], v: list[bytes]) -> None:
        sc = self.scale
        text = f"{i:04d}"
        pad = 2 * sc
        plate_w = min(self.w, (4 * len(text) - 1) * sc + 2 * pad) & ~1
        plate_h = min(self.h, 5 * sc + 2 * pad) & ~1
        _fill(luma, 0, 0, plate_w, plate_h, 16)
        _fill(u, 0, 0, plate_w // 2, plate_h // 2, 128)
        _fill(v, 0, 0, plate_w // 2, plate_h // 2, 128)
        for gy in range(5):
            cells = "0".join(_FONT[int(c)][3 * gy : 3 * gy + 3] for c in text)
            line = b"".join(b"\xeb" * sc if c == "1" else b"\x10" * sc for c in cells)
            line = line[: max(0, plate_w - pad)]
            for r in range(pad + gy * sc, min(plate_h, pad + (gy + 1) * sc)):
                row = luma[r]
                luma[r] = row[:pad] + line + row[pad + len(line) :]


def _fill(rows: list[bytes], x: int, y: int, w: int, h: int, value: int) -> None:
    """Paint a w x h rectangle at (x, y), clipped to the plane."""
    if not rows:
        return
    width = len(rows[0])
    x1, y1 = min(width, x + w), min(len(rows), y + h)
    x, y = max(0, x), max(0, y)
    if x >= x1 or y >= y1:
        return
    patch = bytes([value]) * (x1 - x)
    for r in range(y, y1):
        row = rows[r]
        rows[r] = row[:x] + patch + row[x1:]


def _pack(rows: Sequence[bytes], stride: int, height: int) -> bytes:
    if len(rows) != height:
        raise ValueError(f"{len(rows)} rows for a plane of {height}")
    if rows and len(rows[0]) == stride:
        return b"".join(rows)
    return b"".join(row.ljust(stride, b"\x00") for row in rows)


def _video_pts(index: int, fps: int) -> int:
    return index * VIDEO_TIME_BASE.denominator // fps


# --- cache ------------------------------------------------------------------


def _digest(video: Sequence[MediaPacket], audio: Sequence[MediaPacket]) -> str:
    h = hashlib.sha256()
    for packet in (*video, *audio):
        h.update(f"{packet.kind}:{int(packet.keyframe)}:{len(packet.data)}:".encode())
        h.update(packet.data)
    return h.hexdigest()


def _write_webm(
    path: Path, p: _Params, video: Sequence[MediaPacket], audio: Sequence[MediaPacket]
) -> None:
    """Mux the packets into ``path`` atomically (temporary file, then rename)."""
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes it private; the cache may be shared by several users
    try:
        with av.open(tmp_name, "w", format="webm") as out:
            out.metadata[DIGEST_TAG] = _digest(video, audio)
            vstream = out.add_mux_stream("libvpx", rate=p.fps, width=p.width, height=p.height)
            # Opus in WebM needs its OpusHead as CodecPrivate: let an (unused) encoder
            # context produce it when the header is written.
            astream = out.add_stream("libopus", rate=AUDIO_RATE)
            astream.codec_context.layout = AUDIO_LAYOUT
            astream.codec_context.format = "s16"
            astream.codec_context.bit_rate = AUDIO_BITRATE
            vt, at = Fraction(1, p.fps), AUDIO_TIME_BASE
            for index, media in _interleave(video, audio):
                packet = av.Packet(media.data)
                if media.kind == "video":
                    packet.stream = vstream
                    packet.time_base, packet.duration = vt, 1
                else:
                    packet.stream = astream
                    packet.time_base, packet.duration = at, AUDIO_FRAME_SAMPLES
                packet.pts = packet.dts = index * packet.duration
                packet.is_keyframe = media.keyframe
                out.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _interleave(
    video: Sequence[MediaPacket], audio: Sequence[MediaPacket]
) -> Iterator[tuple[int, MediaPacket]]:
    """(index within its track, packet) in presentation order across both tracks."""
    tagged = [(float(m.pts * m.time_base), i, m) for i, m in enumerate(video)]
    tagged += [(float(m.pts * m.time_base), i, m) for i, m in enumerate(audio)]
    tagged.sort(key=lambda t: (t[0], t[2].kind))
    for _, index, media in tagged:
        yield index, media


def _try_read(path: Path, p: _Params, *, warn: bool) -> Clip | None:
    if not path.exists():
        return None
    try:
        return _read_webm(path, p)
    except (ClipCacheError, av.FFmpegError, OSError) as exc:
        if warn:
            logger.warning("clip cache %s unusable (%s): encoding it again", path.name, exc)
        return None


def _read_webm(path: Path, p: _Params) -> Clip:
    video: list[MediaPacket] = []
    audio: list[MediaPacket] = []
    with av.open(str(path), "r") as container:
        expected_digest = container.metadata.get(DIGEST_TAG)
        if expected_digest is None:
            # Matroska may hand tag names back in another case
            expected_digest = {k.upper(): v for k, v in container.metadata.items()}.get(DIGEST_TAG)
        for packet in container.demux(container.streams.video[0], container.streams.audio[0]):
            if packet.size == 0:
                continue  # end-of-stream marker
            data = bytes(packet)
            if packet.stream.type == "video":
                if packet.is_keyframe != is_vp8_keyframe(data):
                    raise ClipCacheError(f"keyframe flag wrong on video packet {len(video)}")
                pts = _video_pts(len(video), p.fps)
                video.append(MediaPacket(data, pts, VIDEO_TIME_BASE, packet.is_keyframe, "video"))
            else:
                pts = len(audio) * AUDIO_FRAME_SAMPLES
                audio.append(MediaPacket(data, pts, AUDIO_TIME_BASE, True, "audio"))
    if len(video) != p.video_frames or len(audio) != p.audio_frames:
        raise ClipCacheError(
            f"{len(video)} video / {len(audio)} audio packets,"
            f" expected {p.video_frames} / {p.audio_frames}"
        )
    if expected_digest != _digest(video, audio):
        raise ClipCacheError("packet digest does not match the one written")
    return _make_clip(p, video, audio)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- shared -----------------------------------------------------------------


def _make_clip(p: _Params, video: Sequence[MediaPacket], audio: Sequence[MediaPacket]) -> Clip:
    keyframes = tuple(i for i, m in enumerate(video) if m.keyframe)
    if keyframes != p.keyframes:
        logger.warning("clip keyframes at %s, wanted %s", keyframes[:8], p.keyframes[:8])
    duration = len(video) / p.fps
    bits = 8 * sum(len(m.data) for m in video)
    return Clip(
        video=tuple(video),
        audio=tuple(audio),
        width=p.width,
        height=p.height,
        fps=p.fps,
        duration_s=duration,
        keyframe_indices=keyframes,
        video_bitrate=round(bits / duration),
    )


def _validate(p: _Params) -> None:
    if p.width < 16 or p.height < 16 or p.width % 2 or p.height % 2:
        raise ValueError(f"width and height must be even and >= 16, got {p.width}x{p.height}")
    if p.fps <= 0 or p.bitrate <= 0 or p.keyframe_interval <= 0:
        raise ValueError("fps, bitrate and keyframe_interval must be positive")
    if p.video_frames < 1 or p.audio_frames < 1:
        raise ValueError(f"{p.seconds} s is too short for one video and one audio frame")
