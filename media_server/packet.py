"""MediaPacket: one encoded frame as it travels through the SFU, never decoded.

aiortc's ``RTCRtpSender`` packs anything that is not a decoded ``Frame`` through
the codec's ``pack()``, which only reads ``bytes(packet)``, ``packet.pts`` and
``packet.time_base``.  A small immutable object with those three is cheaper than
an ``av.Packet`` (no copy into FFmpeg memory) and can be shared by every
subscriber of a track; a subscriber that needs other timestamps gets a copy via
:meth:`MediaPacket.with_pts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

VIDEO_TIME_BASE = Fraction(1, 90000)
AUDIO_TIME_BASE = Fraction(1, 48000)

# What a frame costs on the wire beyond its payload: aiortc packetizes at most
# 1300 bytes per RTP packet (codecs/vpx.py, h264.py), and each packet carries
# RTP (12) + header extensions (abs-send-time, mid, audio level: ~12) + codec
# descriptor (~4) + SRTP tag (10) + UDP (8) + IPv4 (20).
RTP_PAYLOAD_MAX = 1296
PACKET_OVERHEAD_BYTES = 66


def wire_bytes(payload: int) -> int:
    """Bytes one frame of ``payload`` bytes takes on the wire, headers included."""
    return payload + (payload // RTP_PAYLOAD_MAX + 1) * PACKET_OVERHEAD_BYTES


def wire_bps(payload_bps: float, frames_per_s: float) -> int:
    """A stream's rate on the wire, from its payload rate and frame rate."""
    frame = payload_bps / 8 / max(frames_per_s, 1.0)
    return int(8 * wire_bytes(int(frame)) * frames_per_s)


@dataclass(frozen=True, slots=True)
class MediaPacket:
    """One encoded frame (VP8, H.264 Annex B or Opus)."""

    data: bytes
    pts: int
    time_base: Fraction
    keyframe: bool
    kind: str  # "audio" | "video"

    def __bytes__(self) -> bytes:
        return self.data

    def with_pts(self, pts: int) -> MediaPacket:
        return MediaPacket(self.data, pts, self.time_base, self.keyframe, self.kind)


def is_vp8_keyframe(data: bytes) -> bool:
    """VP8 payload header (RFC 6386 9.1): bit 0 of the first byte is 0 on key frames."""
    return len(data) > 0 and data[0] & 1 == 0


def vp8_keyframe_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a VP8 keyframe header (RFC 6386 9.1), None if not one."""
    if len(data) < 10 or data[0] & 1 or data[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(data[6:8], "little") & 0x3FFF
    height = int.from_bytes(data[8:10], "little") & 0x3FFF
    return (width, height) if width and height else None


def is_h264_keyframe(data: bytes) -> bool:
    """Annex B stream containing an IDR slice (5) or a sequence parameter set (7)."""
    i = 0
    n = len(data)
    while i + 3 < n:
        if data[i] == 0 and data[i + 1] == 0:
            if data[i + 2] == 1:
                start = i + 3
            elif data[i + 2] == 0 and data[i + 3] == 1:
                start = i + 4
            else:
                i += 1
                continue
            if start < n and data[start] & 0x1F in (5, 7):
                return True
            i = start
        else:
            i += 1
    return False


def is_keyframe(mime_type: str, data: bytes) -> bool:
    mime = mime_type.lower()
    if mime == "video/vp8":
        return is_vp8_keyframe(data)
    if mime == "video/h264":
        return is_h264_keyframe(data)
    # audio frames are independently decodable
    return True
