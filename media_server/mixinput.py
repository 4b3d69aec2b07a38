"""InputTimeline: one publisher's audio, decoded once and laid on the mixer's clock.

The :class:`~media_server.audiomix.AudioMixer` keeps a timeline of 48 kHz
samples driven by the wall clock.  Each input (a published Opus track used by
some mix) is decoded to mono PCM and written into a ring buffer at the place
its RTP timestamp says:

* the input is *anchored* on its first packet: that packet lands
  ``JITTER_DELAY_S`` after its arrival, and every later packet lands where its
  timestamp says relative to it, so arrival jitter up to the delay is absorbed;
* a packet whose place has already been mixed is *late* and dropped (that
  input is silent there: the mix never waits); an input late for
  ``LATE_RESYNC_S`` in a row is anchored again on its newest packet (its path
  got slower), as is one whose packet would land more than ``MAX_AHEAD_S``
  ahead or a second behind (a timestamp jump, a restarted stream);
* what the mixer has read for good is zeroed (:meth:`InputTimeline.forget`),
  so a stretch no packet filled reads as silence.

Used only by the mixer's worker thread.
"""

from __future__ import annotations

from typing import Any

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext

from .packet import MediaPacket

SAMPLE_RATE = 48000
RING_SAMPLES = SAMPLE_RATE  # 1 s of timeline per input
MAX_FRAME_SAMPLES = 2880  # 60 ms: the longest frame a mix reads at once
JITTER_DELAY_S = 0.04  # an input's packets are mixed this long after they arrive
MAX_AHEAD_S = 0.25  # a packet further ahead of its due place re-anchors its input
LATE_RESYNC_S = 0.2  # an input late for this long is anchored again
_RTP_WRAP = 1 << 32
_DELAY = round(JITTER_DELAY_S * SAMPLE_RATE)
_AHEAD = round(MAX_AHEAD_S * SAMPLE_RATE)

Pcm = np.ndarray[Any, np.dtype[np.int16]]


class InputTimeline:
    """Decoded PCM of one publisher, placed by RTP timestamp on the mixer's timeline."""

    def __init__(self, track_id: str) -> None:
        self.track_id = track_id
        self._decoder: AudioCodecContext | None = None
        self._ring: Pcm = np.zeros(RING_SAMPLES, np.int16)
        self._offset: int | None = None  # timeline position = extended timestamp + offset
        self._last_ext: int | None = None
        self._late_since: float | None = None
        self.written_until = 0  # end of the newest samples written
        self.packets = 0
        self.late = 0
        self.resyncs = 0
        self.decode_errors = 0

    def place(self, packet: MediaPacket, arrived_at: int, arrival: float, mixed_until: int) -> None:
        """Decode ``packet`` and write it where it belongs.

        ``arrived_at``: the timeline position of its arrival; ``arrival``: the same
        in seconds; ``mixed_until``: the timeline is mixed up to there (earlier
        places are too late).
        """
        self.packets += 1
        pcm = self._decode(packet)
        ext = self._extend(packet)
        target = arrived_at + _DELAY
        if self._offset is None:
            self._offset = target - ext
        pos = ext + self._offset
        if pos - target > _AHEAD or target - pos > SAMPLE_RATE:
            self._offset, pos = target - ext, target  # a jump: start again from here
            self.resyncs += 1
            self._late_since = None
        elif pos < mixed_until:
            if self._late_since is None:
                self._late_since = arrival
            if arrival - self._late_since < LATE_RESYNC_S:
                self.late += 1
                return
            self._offset, pos = target - ext, target  # persistently late: more delay
            self.resyncs += 1
            self._late_since = None
        else:
            self._late_since = None
        if pcm is None or not len(pcm):
            return
        n = min(len(pcm), mixed_until + RING_SAMPLES - MAX_FRAME_SAMPLES - pos)
        if n > 0:
            _write(self._ring, pos, pcm[:n])
            self.written_until = max(self.written_until, pos + n)

    def read(self, pos: int, size: int) -> Pcm:
        """``size`` samples from timeline position ``pos`` (silence where nothing came)."""
        start = pos % RING_SAMPLES
        if start + size <= RING_SAMPLES:
            return self._ring[start : start + size]
        return np.concatenate((self._ring[start:], self._ring[: start + size - RING_SAMPLES]))

    def forget(self, pos: int, size: int) -> None:
        """Zero a stretch that no mix will read again."""
        if pos + size <= 0:
            return
        start = pos % RING_SAMPLES
        if start + size <= RING_SAMPLES:
            self._ring[start : start + size] = 0
        else:
            self._ring[start:] = 0
            self._ring[: start + size - RING_SAMPLES] = 0

    def clear(self) -> None:
        self._ring[:] = 0

    def _decode(self, packet: MediaPacket) -> Pcm | None:
        if self._decoder is None:
            decoder = av.CodecContext.create("libopus", "r")
            decoder.sample_rate = SAMPLE_RATE
            decoder.layout = "mono"
            decoder.format = "s16"
            self._decoder = decoder
        try:
            frames = self._decoder.decode(av.Packet(packet.data))
        except av.FFmpegError:
            self.decode_errors += 1
            return None
        if not frames:
            return None
        parts = [np.asarray(f.to_ndarray(), np.int16).reshape(-1) for f in frames]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _extend(self, packet: MediaPacket) -> int:
        """The packet's timestamp in 48 kHz ticks, unwrapped past 2**32."""
        pts = round(packet.pts * packet.time_base * SAMPLE_RATE)
        if self._last_ext is not None:
            delta = (pts - self._last_ext) % _RTP_WRAP
            if delta >= _RTP_WRAP // 2:
                delta -= _RTP_WRAP
            pts = self._last_ext + delta
            self._last_ext = max(self._last_ext, pts)
        else:
            self._last_ext = pts
        return pts


def _write(ring: Pcm, pos: int, pcm: Pcm) -> None:
    start = pos % RING_SAMPLES
    first = min(len(pcm), RING_SAMPLES - start)
    ring[start : start + first] = pcm[:first]
    if first < len(pcm):
        ring[: len(pcm) - first] = pcm[first:]
