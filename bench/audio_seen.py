"""What audio reached the weak viewer: each publisher's originals and the server's mixes.

The weak-link benchmark counts audio where the emulated link hands packets to
the client (SRTP leaves the RTP header in clear).  A viewer on a thin link may
receive one *mix* of every publisher on one transceiver instead of the
originals (``audio_mode`` messages say when, on which mid, in which format).
Each audio packet is classified by its **send time** against those messages:
the time it reached the link emulator, which sits on the client's socket and
receives the server's packets over loopback before applying the link's delay
and queue (aiortc puts abs-send-time on video only).

* an **original** counts for its publisher: one 20 ms slot, placed by its RTP
  timestamp (slots are anchored on the packet with the shortest trip);
* a **mix** packet counts for every mixed publisher: ``frame_ms / 20`` slots
  each.  Within one ``audio_mode`` period the carrier's timestamps lie on one
  grid of ``frame_ms`` (a new period rebinds and rebases), so a lost mix frame
  is a missing grid point.  The grid is the one most of the period's packets
  share (a straggler of the previous mix may come first), anchored on the
  shortest send delay; a frame within one frame of either end of the period
  counts only if it arrived (the mixer's first and last frames may or may not
  exist).

A publisher's original slots are expected only outside its mix periods, so a
phase that switches to the mix loses nothing by switching.  Duplicated mix
packets (``copies`` 2: same timestamp) count once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

AUDIO_PACKET_S = 0.02
AUDIO_TICKS = 960  # 20 ms at 48 kHz
_WRAP = 1 << 32


@dataclass(frozen=True, slots=True)
class LinkAudio:
    """One audio RTP packet as the link delivered it."""

    arrival: float  # time.monotonic()
    send: float | None  # when it entered the emulator: the server's send time (monotonic)
    mid: str
    pid: str  # owner of the mid at arrival
    ts: int  # RTP timestamp, as sent


@dataclass(slots=True)
class MixSegment:
    """One audio_mode period of mixing: the carrier mid, format and who is mixed."""

    start: float  # monotonic
    end: float
    mid: str
    frame_ms: int
    pids: tuple[str, ...]
    name: str = ""  # e.g. "16k/60ms x2"
    packets: list[tuple[float, float, int]] = field(default_factory=list)  # arrival, send, ts


@dataclass(slots=True)
class AudioSeen:
    originals: dict[str, list[tuple[float, int]]]  # pid -> (arrival, unwrapped ts)
    segments: list[MixSegment]
    mixed: dict[str, list[tuple[float, float]]]  # pid -> its mix periods (send time)

    def mix_share(self, t0: float, t1: float) -> float:
        """Share of [t0, t1] spent mixing."""
        covered = sum(max(0.0, min(t1, s.end) - max(t0, s.start)) for s in self.segments)
        return covered / (t1 - t0) if t1 > t0 else 0.0

    def mode_at(self, t: float) -> str:
        for s in self.segments:
            if s.start <= t < s.end:
                return f"mix {s.name}"
        return "originals"


def opus_duration_ms(data: bytes) -> float | None:
    """An Opus packet's duration from its TOC byte (RFC 6716 3.1)."""
    if not data:
        return None
    config, code = data[0] >> 3, data[0] & 3
    if config < 12:
        frame = (10.0, 20.0, 40.0, 60.0)[config % 4]
    elif config < 16:
        frame = (10.0, 20.0)[config % 2]
    else:
        frame = (2.5, 5.0, 10.0, 20.0)[config % 4]
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    elif len(data) > 1:
        count = data[1] & 0x3F
    else:
        return None
    return frame * count


def ts_delta(ts: int, ref: int) -> int:
    """``ts - ref`` across the 32-bit wrap (negative: an earlier, late packet)."""
    delta = (ts - ref) % _WRAP
    return delta - _WRAP if delta >= _WRAP // 2 else delta


def append_ts(packets: list[tuple[float, int]], ts: int, arrival: float) -> None:
    """Append (arrival, RTP timestamp unwrapped past 2^32)."""
    if packets:
        last = packets[-1][1]
        ts = last + ts_delta(ts, last)
    packets.append((arrival, ts))


def split_audio(
    packets: Iterable[LinkAudio], events: Sequence[tuple[float, dict[str, Any]]]
) -> AudioSeen:
    """Originals per publisher and mix segments, from the link's packets and audio_mode."""
    ordered = sorted(events, key=lambda e: e[0])
    segments: list[MixSegment] = []
    mixed: dict[str, list[tuple[float, float]]] = {}
    for i, (at, msg) in enumerate(ordered):
        until = ordered[i + 1][0] if i + 1 < len(ordered) else math.inf
        if msg.get("mode") != "mix":
            continue
        pids = tuple(str(t["participant_id"]) for t in msg.get("tracks", []))
        name = f"{msg.get('format')} x{msg.get('copies', 1)}"
        segments.append(
            MixSegment(at, until, str(msg.get("mid")), int(msg["frame_ms"]), pids, name)
        )
        for pid in pids:
            mixed.setdefault(pid, []).append((at, until))
    originals: dict[str, list[tuple[float, int]]] = {}
    for pkt in packets:
        sent = pkt.send if pkt.send is not None else pkt.arrival
        segment = next((s for s in segments if s.mid == pkt.mid and s.start <= sent < s.end), None)
        if segment is not None:
            segment.packets.append((pkt.arrival, sent, pkt.ts))
        else:
            append_ts(originals.setdefault(pkt.pid, []), pkt.ts, pkt.arrival)
    return AudioSeen(originals, segments, mixed)


def _inside(t: float, intervals: Sequence[tuple[float, float]]) -> bool:
    return any(a <= t < b for a, b in intervals)


def audio_phase(
    packets: Sequence[tuple[float, int]],
    t0: float,
    t1: float,
    excluded: Sequence[tuple[float, float]] = (),
) -> tuple[int, int, float, list[float]]:
    """(expected, received, longest hole ms, arrivals in [t0, t1]) for one publisher's
    20 ms originals *sent* in [t0, t1] outside ``excluded`` (its mix periods).  Send
    times come from the timestamps: one packet per 20 ms, anchored on the packet that
    had the shortest trip."""
    if not packets:
        slots = [t0 + k * AUDIO_PACKET_S for k in range(int((t1 - t0) / AUDIO_PACKET_S))]
        wanted = [t for t in slots if not _inside(t, excluded)]
        return len(wanted), 0, _longest_run(not _inside(t, excluded) for t in slots), []
    ref = packets[0][1]
    indexed = [(arrival, round((ts - ref) / AUDIO_TICKS)) for arrival, ts in packets]
    anchor = min(arrival - idx * AUDIO_PACKET_S for arrival, idx in indexed)
    first = math.ceil((t0 - anchor) / AUDIO_PACKET_S)
    last = math.floor((t1 - anchor) / AUDIO_PACKET_S) - 1
    got = {idx for _, idx in indexed}
    expected = received = 0
    missing: list[bool] = []
    for idx in range(first, last + 1):
        if _inside(anchor + idx * AUDIO_PACKET_S, excluded):
            missing.append(False)
            continue
        expected += 1
        received += idx in got
        missing.append(idx not in got)
    arrivals = [a for a, _ in packets if t0 <= a <= t1]
    return expected, received, _longest_run(missing) * AUDIO_PACKET_S * 1000, arrivals


def mix_phase(segment: MixSegment, t0: float, t1: float) -> tuple[int, int, float, list[float]]:
    """(expected frames, received frames, longest hole ms, arrivals in [t0, t1]) of one
    mix segment's frames sent in [t0, t1]."""
    lo, hi = max(t0, segment.start), min(t1, segment.end)
    frame_s = segment.frame_ms / 1000
    ticks = 48 * segment.frame_ms
    if hi <= lo:
        return 0, 0, 0.0, []
    if not segment.packets:
        frames = int((hi - lo) / frame_s)
        return frames, 0, frames * frame_s * 1000, []
    ref = _grid_reference(segment.packets, ticks)
    grid: dict[int, float] = {}  # frame index -> send time
    for _, sent, ts in segment.packets:
        j = ts_delta(ts, ref) / ticks
        if abs(j - round(j)) < 0.25:  # on the grid
            grid.setdefault(round(j), sent)
    if not grid:
        return 0, 0, 0.0, []
    anchor = min(sent - j * frame_s for j, sent in grid.items())
    first = math.ceil((lo - anchor) / frame_s)
    last = math.floor((hi - anchor) / frame_s) - 1
    sure_from, sure_until = segment.start + frame_s, segment.end - frame_s
    expected = received = 0
    missing: list[bool] = []
    for j in range(first, last + 1):
        at = anchor + j * frame_s
        if j in grid:
            expected += 1
            received += 1
            missing.append(False)
        elif sure_from <= at < sure_until:
            expected += 1
            missing.append(True)
    arrivals = [a for a, _, _ in segment.packets if t0 <= a <= t1]
    return expected, received, _longest_run(missing) * frame_s * 1000, arrivals


def _grid_reference(packets: Sequence[tuple[float, float, int]], ticks: int) -> int:
    """A timestamp on the grid most of the period's packets share.  The first packet
    is no safe anchor: at a change of mix a straggler of the previous mix can leave
    the server just after the new period began, on another grid."""
    first = packets[0][2]
    phases = Counter(ts_delta(ts, first) % ticks for _, _, ts in packets)
    return (first + phases.most_common(1)[0][0]) % _WRAP


def mix_timestamp_jumps(segment: MixSegment, slack_s: float = 0.5) -> list[tuple[float, float]]:
    """(send time, seconds) where the mix's RTP timestamps moved off the frame grid or
    ran ahead of the send times by more than ``slack_s``: a lost frame is a missing
    grid point only while the timestamps keep to one grid, so after such a jump
    :func:`mix_phase` counts frames that arrived as lost (a hole with no silence).
    """
    ticks = 48 * segment.frame_ms
    jumps: list[tuple[float, float]] = []
    previous: tuple[float, int] | None = None
    for _, sent, ts in sorted(segment.packets, key=lambda p: p[1]):
        if previous is not None:
            delta = ts_delta(ts, previous[1])
            ahead = delta / 48_000 - (sent - previous[0])
            off_grid = abs(delta / ticks - round(delta / ticks)) >= 0.25
            if off_grid or abs(ahead) > slack_s:
                jumps.append((sent, delta / 48_000))
        previous = (sent, ts)
    return jumps


def _longest_run(flags: Iterable[bool]) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def phase_audio(
    seen: AudioSeen, pids: Sequence[str], t0: float, t1: float
) -> tuple[float, list[float], float, float]:
    """(loss, loss per publisher, longest hole ms, longest arrival gap ms) over [t0, t1]:
    every publisher's 20 ms of audio sent in the phase, as an original or in a mix."""
    expected = dict.fromkeys(pids, 0.0)
    received = dict.fromkeys(pids, 0.0)
    arrivals: dict[str, list[float]] = {p: [] for p in pids}
    hole = 0.0
    for p in pids:
        e, r, h, a = audio_phase(seen.originals.get(p, []), t0, t1, seen.mixed.get(p, []))
        expected[p] += e
        received[p] += r
        hole = max(hole, h)
        arrivals[p] += a
    for segment in seen.segments:
        e, r, h, a = mix_phase(segment, t0, t1)
        units = segment.frame_ms / 20
        hole = max(hole, h)
        for p in segment.pids:
            if p in expected:
                expected[p] += e * units
                received[p] += r * units
                arrivals[p] += a
    gap = 0.0
    for p in pids:
        edge = t0
        for at in [*sorted(arrivals[p]), t1]:
            gap = max(gap, at - edge)
            edge = at
    total_e = sum(expected.values())
    loss = 1 - sum(received.values()) / total_e if total_e else 0.0
    per_pub = [1 - received[p] / expected[p] if expected[p] else 0.0 for p in pids]
    return loss, per_pub, hole, gap * 1000
