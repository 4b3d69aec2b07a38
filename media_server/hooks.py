"""Every use of aiortc private API in Konsilium, in one module.

aiortc 1.16 has no public seam for forwarding media without decoding it, for
asking a publisher for a keyframe, or for reading the RTCP feedback that a
subscriber sends to one of our senders.  The seams used here:

* ``RTCRtpReceiver.__decoder_queue`` — where ``_handle_rtp_packet`` puts each
  reassembled ``(codec, JitterFrame)``; replaced (in a wrapper around
  ``RTCRtpReceiver.receive``, before the decoder thread starts) by a queue whose
  ``put`` turns the frame into a :class:`MediaPacket` and hands it to the remote
  track's asyncio queue ``RemoteStreamTrack._queue`` on the loop thread: the
  remote track becomes a packet stream and no thread touches the packets.
* ``JitterFrame.data`` / ``.timestamp`` — the reassembled frame.
* ``RTCRtpReceiver.__jitter_buffer`` and ``JitterBuffer._origin/_packets/
  _capacity/remove/_remove_frame`` — video receivers get a
  :class:`GapSkippingJitterBuffer` in the same wrapper.
* ``RTCRtpReceiver._send_rtcp_pli(ssrc)`` — sends a PLI to the publisher.
* ``RTCRtpReceiver._RTCRtpReceiver__rtx_ssrc`` — RTX SSRCs, to exclude them.
* ``RTCRtpSender._handle_rtcp_packet`` — the per-sender RTCP entry point that
  the DTLS transport looks up on the instance for every packet; wrapped per
  instance to observe PLI/FIR, REMB and receiver reports, and to thin out
  NACKs before aiortc retransmits (it resends every listed packet, every time).
* ``RTCRtpReceiver._handle_rtp_packet`` — wrapped per audio receiver to read
  each packet's RFC 6464 audio level (active speaker, :mod:`speaker`).
* ``RTCRtpSender._next_encoded_frame`` — wrapped per bot sender to put an
  audio level on pre-encoded Opus (:func:`send_audio_levels`).
* ``RTCRtpSender.__rtp_history`` / ``_retransmit(seq)`` — the packets a sender
  keeps for NACKs; replaced, while a link needs video sent twice, by a history
  that also resends each new packet (RTX when negotiated) a little later (see
  :func:`repeat_packets`).
* ``RTCRtpSender._ssrc`` — the sender's media SSRC; ``RTCRtpSender.__rtt`` —
  the RTT aiortc derives from receiver reports, and ``__lsr`` / ``__lsr_time``
  — its latest SR and when it went, to tell a fresh RTT from an old one;
  ``_send_rtcp`` is wrapped per tapped sender to remember its last
  :data:`SR_MEMORY` SRs, so each report block gives its own round trip.
* ``RTCDtlsTransport.__rx_packets`` — packets received, a sign of life of a
  participant's link (see :func:`packets_received`).
* ``RTCDtlsTransport._rx_srtp`` / ``._handle_rtp_data`` — only for the
  benchmark's light viewers (see :func:`count_rtp_headers`).
* ``aiortc.clock.current_ntp_time`` / ``current_ms`` — replaced by faster
  equivalents (see :func:`install_fast_clock`).
* ``aioice.ice.StunProtocol.request`` — consent checks (its only requests with
  ``retransmissions=0``) get retransmissions (see :func:`patient_consent_checks`).
* ``aioice.ice.StunProtocol.connection_made`` — where each ICE socket appears;
  wrapped to enlarge the kernel buffers (see :func:`enlarge_udp_buffers`).

``check_hooks()`` fails loudly when any of these is gone; a unit test calls it
and an integration test proves the whole path with real media.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import aiortc.clock as aiortc_clock
import aiortc.rtcrtpreceiver as _receiver_module
from aioice.ice import StunProtocol
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    unpack_remb_fci,
)

from .packet import MediaPacket, is_keyframe, wire_bytes
from .speaker import AudioLevel

logger = logging.getLogger(__name__)

PASSTHROUGH_MIME_TYPES = frozenset({"video/vp8", "video/h264", "audio/opus"})
GAP_MAX_WAIT_S = 0.25  # how long a lost video packet may hold back newer frames ...
GAP_WAIT_CAP_S = 1.0  # ... at most, once repairs are seen to take longer (satellite)
GAP_REPAIR_MARGIN = 1.3  # wait this much longer than a typical repair took


class HookError(RuntimeError):
    """An aiortc internal that Konsilium relies on is missing or changed."""


class PassthroughDecoder:
    """Stands in for aiortc's decoder: turns a reassembled frame into a MediaPacket."""

    def __init__(self, mime_type: str, clock_rate: int) -> None:
        self._mime = mime_type.lower()
        self._kind = "video" if self._mime.startswith("video/") else "audio"
        self._time_base = Fraction(1, clock_rate)

    def decode(self, encoded_frame: Any) -> list[MediaPacket]:
        data: bytes = encoded_frame.data
        return [
            MediaPacket(
                data=data,
                pts=int(encoded_frame.timestamp),
                time_base=self._time_base,
                keyframe=is_keyframe(self._mime, data),
                kind=self._kind,
            )
        ]


class _DirectQueue:
    """Stands in for a receiver's decoder queue: delivers packets on the event-loop thread.

    aiortc's receiver puts each reassembled frame into a ``queue.Queue`` that a
    decoder thread per receiver drains, handing results back with
    ``run_coroutine_threadsafe``.  With dozens of receivers in one process those
    threads fight the event loop for the GIL, the loop falls behind its UDP
    sockets and the kernel drops packets.  ``put`` is called by
    ``_handle_rtp_packet`` on the loop thread, so the packet can go straight into
    the remote track's asyncio queue; the decoder thread still starts but only
    waits in ``get`` until the receiver stops.
    """

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self._receiver = receiver
        self._stopped = threading.Event()
        self._decoder: PassthroughDecoder | None = None
        self._mime = ""

    def put(self, task: Any) -> None:
        if task is None:  # the receiver is stopping: release the waiting thread
            self._stopped.set()
            return
        codec, encoded_frame = task
        mime = str(codec.mimeType).lower()
        if self._decoder is None or mime != self._mime:
            self._decoder = PassthroughDecoder(mime, int(codec.clockRate))
            self._mime = mime
        track = self._receiver._track
        if track is None:
            return
        track_queue = track._queue
        for packet in self._decoder.decode(encoded_frame):
            track_queue.put_nowait(packet)

    def get(self) -> None:
        self._stopped.wait()
        return None


class GapSkippingJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, but a lost packet blocks for a bounded time only.

    aiortc releases nothing behind a missing packet until 512 newer packets have
    arrived: seconds of frozen video on a low-rate stream if the retransmission
    is lost too.  Here, once a hole has blocked the buffer for ``max_wait_s``,
    it jumps to live: everything up to the first frame start after the newest
    hole is dropped (older frames are stale by then) and a keyframe is requested
    (the references are gone).  A frame starts after a marker bit, or where the
    VP8 payload descriptor has S=1 and partition index 0.
    """

    def __init__(self, capacity: int, max_wait_s: float = GAP_MAX_WAIT_S) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self._max_wait_s = max_wait_s
        self._blocked_since: float | None = None
        self.gaps_skipped = 0
        # how long repairs take on this link (NACK -> retransmission), learnt from the
        # holes that were filled: on a satellite link a repair takes over 600 ms, and
        # giving up after 250 ms turns every lost packet into a keyframe request
        self._highest: int | None = None
        self._missing: dict[int, float] = {}  # sequence number -> when it was missed
        self.repair_s: float | None = None  # smoothed repair time

    @property
    def max_wait_s(self) -> float:
        """How long a hole may hold back newer frames now."""
        if self.repair_s is None:
            return self._max_wait_s
        return min(GAP_WAIT_CAP_S, max(self._max_wait_s, GAP_REPAIR_MARGIN * self.repair_s))

    def add(self, packet: Any) -> tuple[bool, Any]:
        now = time.monotonic()
        self._learn_repair_time(packet.sequence_number, now)
        pli, frame = super().add(packet)
        if frame is not None or self._origin is None or not self._hole_before(packet):
            self._blocked_since = None
            return pli, frame
        if self._blocked_since is None:
            self._blocked_since = now
        if now - self._blocked_since < self.max_wait_s:
            return pli, frame
        # waited long enough for a repair: jump to the newest frame that can be
        # complete, dropping the older ones (stale by now) and the one with the hole
        if self._jump_past_last_hole():
            self._blocked_since = None
            self.gaps_skipped += 1
            complete = self._take_frame_at_origin()
            return True, complete if complete is not None else self._remove_frame(
                packet.sequence_number
            )
        return pli, frame

    def _learn_repair_time(self, seq: int, now: float) -> None:
        missed_at = self._missing.pop(seq, None)
        if missed_at is not None:  # a hole filled: that is how long a repair takes
            took = now - missed_at
            self.repair_s = took if self.repair_s is None else 0.8 * self.repair_s + 0.2 * took
            return
        highest = self._highest
        if highest is None:
            self._highest = seq
            return
        ahead = (seq - highest) & 0xFFFF
        if ahead == 0 or ahead >= 0x8000:
            return  # a duplicate or an old packet
        self._highest = seq
        for gap in range(1, min(ahead, 64)):
            self._missing[(highest + gap) & 0xFFFF] = now
        if len(self._missing) > 256:  # never repaired: forget the oldest
            for old in sorted(self._missing, key=self._missing.__getitem__)[:128]:
                del self._missing[old]

    def _hole_before(self, packet: Any) -> bool:
        assert self._origin is not None
        span = (packet.sequence_number - self._origin) & 0xFFFF
        return any(
            self._packets[(self._origin + i) % self._capacity] is None
            for i in range(min(span, self._capacity))
        )

    def _take_frame_at_origin(self) -> JitterFrame | None:
        """The frame at the origin, if its packets through the marker bit are all here."""
        assert self._origin is not None
        parts = []
        for count in range(self._capacity):
            pkt = self._packets[(self._origin + count) % self._capacity]
            if pkt is None:
                return None
            parts.append(pkt)
            if pkt.marker:
                frame = JitterFrame(
                    data=b"".join(p._data for p in parts),  # type: ignore[attr-defined]
                    timestamp=parts[0].timestamp,
                )
                self.remove(count + 1)
                return frame
        return None

    def _jump_past_last_hole(self) -> bool:
        """Move the origin to the first frame start after the newest hole; False if none."""
        assert self._origin is not None
        last_hole = None
        newest = 0
        for count in range(self._capacity):
            if self._packets[(self._origin + count) % self._capacity] is None:
                last_hole = count
            else:
                newest = count
        if last_hole is None or last_hole > newest:
            last_hole = next(
                (
                    c
                    for c in range(newest, -1, -1)
                    if self._packets[(self._origin + c) % self._capacity] is None
                ),
                None,
            )
        if last_hole is None:
            return False
        for count in range(last_hole + 1, newest + 1):
            if self._starts_frame(count):
                self.remove(count)
                return True
        return False

    def _starts_frame(self, count: int) -> bool:
        assert self._origin is not None
        pkt = self._packets[(self._origin + count) % self._capacity]
        if pkt is None:
            return False
        prev = self._packets[(self._origin + count - 1) % self._capacity]
        if prev is not None and prev.marker:
            return True
        payload = pkt.payload
        # VP8 payload descriptor (RFC 7741): S bit set and partition index 0
        return bool(payload) and (payload[0] & 0x17) == 0x10


_DECODER_QUEUE_ATTR = "_RTCRtpReceiver__decoder_queue"
_JITTER_BUFFER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_DECODER_THREAD_ATTR = "_RTCRtpReceiver__decoder_thread"
_ORIGINAL_RECEIVE = "_konsilium_original_receive"


def install_passthrough() -> None:
    """Make every RTCRtpReceiver in this process deliver MediaPackets instead of frames.

    Idempotent. Receivers of codecs other than VP8/H.264/Opus are left to aiortc.
    """
    if getattr(RTCRtpReceiver, _ORIGINAL_RECEIVE, None) is not None:
        return
    original = RTCRtpReceiver.receive

    async def receive(self: RTCRtpReceiver, parameters: Any) -> None:
        codecs = [str(c.mimeType).lower() for c in parameters.codecs]
        media = [m for m in codecs if not m.endswith("/rtx")]
        # receive() runs again on every renegotiation: swap only before the thread starts
        started = getattr(self, _DECODER_THREAD_ATTR, None) is not None
        if not started and media and all(m in PASSTHROUGH_MIME_TYPES for m in media):
            setattr(self, _DECODER_QUEUE_ATTR, _DirectQueue(self))
            current = getattr(self, _JITTER_BUFFER_ATTR, None)
            if media[0].startswith("video/") and type(current) is JitterBuffer:
                setattr(self, _JITTER_BUFFER_ATTR, GapSkippingJitterBuffer(current.capacity))
            if media[0].startswith("audio/"):
                _meter_audio_levels(self)
        await original(self, parameters)

    setattr(RTCRtpReceiver, _ORIGINAL_RECEIVE, original)
    RTCRtpReceiver.receive = receive  # type: ignore[method-assign]


_AUDIO_LEVEL_ATTR = "_konsilium_audio_level"


def _meter_audio_levels(receiver: RTCRtpReceiver) -> None:
    """Feed each packet's RFC 6464 level to an AudioLevel kept on the remote track.

    Wraps ``RTCRtpReceiver._handle_rtp_packet`` on the instance (the DTLS
    transport's router looks it up there); ``RtpPacket.extensions.audio_level``
    is ``(voice, level)`` once the extension is negotiated.
    """
    track = receiver._track
    if track is None or getattr(track, _AUDIO_LEVEL_ATTR, None) is not None:
        return
    meter = AudioLevel()
    setattr(track, _AUDIO_LEVEL_ATTR, meter)
    handle = receiver._handle_rtp_packet

    async def metered(packet: Any, arrival_time_ms: int) -> None:
        level = packet.extensions.audio_level
        if level is not None:
            meter.add(int(level[1]), time.monotonic())
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = metered  # type: ignore[method-assign]


def audio_level_of(track: Any) -> AudioLevel | None:
    """The voice activity meter of a received audio track (None for others)."""
    meter = getattr(track, _AUDIO_LEVEL_ATTR, None)
    return meter if isinstance(meter, AudioLevel) else None


def send_audio_levels(sender: RTCRtpSender, level_dbov: Callable[[], int]) -> None:
    """Put an RFC 6464 level on every audio packet ``sender`` sends (bots).

    aiortc computes the level only for audio it encodes itself; for pre-encoded
    packets ``RTCEncodedFrame.audio_level`` is None.  ``level_dbov``: 0 (loudest)
    down to -127 (silence).
    """
    next_frame = sender._next_encoded_frame

    async def with_level(codec: Any) -> Any:
        frame = await next_frame(codec)
        if frame is not None:
            frame.audio_level = level_dbov()
        return frame

    sender._next_encoded_frame = with_level  # type: ignore[method-assign]


def uninstall_passthrough() -> None:
    original = getattr(RTCRtpReceiver, _ORIGINAL_RECEIVE, None)
    if original is None:
        return
    RTCRtpReceiver.receive = original  # type: ignore[method-assign]
    setattr(RTCRtpReceiver, _ORIGINAL_RECEIVE, None)


def passthrough_installed() -> bool:
    return getattr(RTCRtpReceiver, _ORIGINAL_RECEIVE, None) is not None


UDP_BUFFER_BYTES = 2 * 1024 * 1024
_ORIGINAL_CONNECTION_MADE = "_konsilium_original_connection_made"


def enlarge_udp_buffers(size: int = UDP_BUFFER_BYTES) -> None:
    """Give every ICE socket of this process a larger kernel receive/send buffer.

    asyncio reads one datagram per socket per loop iteration, so while the loop
    is busy (a renegotiation, a DTLS handshake) packets queue in the kernel; the
    default ~200 KB (~50 packets on loopback) overflows within tens of ms and the
    lost keyframes turn into NACK/PLI storms.  The kernel caps the value at
    net.core.rmem_max / wmem_max.  Idempotent; patches aioice's StunProtocol.
    """
    if getattr(StunProtocol, _ORIGINAL_CONNECTION_MADE, None) is not None:
        return
    original = StunProtocol.connection_made

    def connection_made(self: StunProtocol, transport: Any) -> None:
        original(self, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, size)
                except OSError as exc:
                    logger.debug("could not enlarge UDP buffer: %s", exc)

    setattr(StunProtocol, _ORIGINAL_CONNECTION_MADE, original)
    StunProtocol.connection_made = connection_made  # type: ignore[method-assign]


NTP_UNIX_OFFSET_S = 2208988800  # seconds from 1900-01-01 to 1970-01-01


def _fast_ntp_time() -> int:
    now = time.time() + NTP_UNIX_OFFSET_S
    seconds = int(now)
    return (seconds << 32) | int((now - seconds) * 4294967296)


def _fast_ms() -> int:
    return int((time.time() + NTP_UNIX_OFFSET_S) * 1000)


def install_fast_clock() -> None:
    """Replace aiortc's NTP clock helpers with float arithmetic.

    aiortc builds a timezone-aware datetime and subtracts another twice for every
    RTP packet it sends (abs-send-time and the SR timestamp): about 5 % of the
    forwarding loop.  Same values, no datetime objects.  Idempotent.
    """
    aiortc_clock.current_ntp_time = _fast_ntp_time
    aiortc_clock.current_ms = _fast_ms


CONSENT_RETRANSMISSIONS = 2
_ORIGINAL_STUN_REQUEST = "_konsilium_original_request"
_STUN_REQUEST = "request"


def patient_consent_checks(retransmissions: int = CONSENT_RETRANSMISSIONS) -> None:
    """Let ICE consent checks survive a satellite link.

    aioice checks consent (RFC 7675) every ~5 s with one STUN request, no
    retransmission and a 0.5 s timeout, and closes the connection after six
    failures in a row: on a 600 ms RTT link (or a queue adding ~350 ms) every
    check fails and the call dies after ~30 s.  Its only zero-retransmission
    requests are the consent checks; they get ``retransmissions`` more tries
    (0.5 + 1 + 2 s, still inside the 5 s interval).  Idempotent.
    """
    if getattr(StunProtocol, _ORIGINAL_STUN_REQUEST, None) is not None:
        return
    original = StunProtocol.request

    async def request(
        self: StunProtocol,
        message: Any,
        addr: Any,
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> Any:
        if retransmissions == 0:
            retransmissions = CONSENT_RETRANSMISSIONS
        return await original(self, message, addr, integrity_key, retransmissions)

    setattr(StunProtocol, _ORIGINAL_STUN_REQUEST, original)
    setattr(StunProtocol, _STUN_REQUEST, request)


def prepare_process() -> None:
    """Everything a process that forwards packets with aiortc needs, once."""
    check_hooks()
    install_passthrough()
    enlarge_udp_buffers()
    install_fast_clock()
    patient_consent_checks()


class _HeaderOnlySrtp:
    """SRTP session stand-in that leaves RTP as received (header readable, payload encrypted)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def unprotect(self, data: bytes) -> bytes:
        return data

    def unprotect_rtcp(self, data: bytes) -> bytes:
        return bytes(self._real.unprotect_rtcp(data))


def packets_received(pc: RTCPeerConnection | None) -> int:
    """Every packet (RTP, RTCP, DTLS) that arrived on ``pc``'s transports.

    Reads ``RTCDtlsTransport.__rx_packets`` (what aiortc's transport stats report
    as ``packetsReceived``); signalling uses it as a sign that a participant's
    link is alive while its WebSocket is slow.
    """
    if pc is None:
        return 0
    total = 0
    seen: set[int] = set()
    for transceiver in pc.getTransceivers():
        transport = transceiver.receiver.transport
        if transport is None or id(transport) in seen:
            continue
        seen.add(id(transport))
        total += int(getattr(transport, _DTLS_RX_PACKETS_ATTR, 0))
    return total


_DTLS_RX_PACKETS_ATTR = "_RTCDtlsTransport__rx_packets"


def count_rtp_headers(dtls_transport: Any, on_rtp: Callable[[bytes], None]) -> None:
    """Load generators only: hand each incoming SRTP packet's bytes to ``on_rtp`` undecrypted.

    SRTP leaves the RTP header in clear, so a benchmark viewer can count complete
    frames (sequence numbers and marker bits per SSRC) without paying for
    decryption, reassembly and the receive-side estimators.  Uses
    ``RTCDtlsTransport._rx_srtp`` (set when DTLS completes) and
    ``RTCDtlsTransport._handle_rtp_data``.  RTCP is still decrypted and handled.
    """
    real = getattr(dtls_transport, "_rx_srtp", None)
    if real is None:
        raise HookError("the DTLS transport has no SRTP session yet")
    if isinstance(real, _HeaderOnlySrtp):
        return
    dtls_transport._rx_srtp = _HeaderOnlySrtp(real)

    async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
        on_rtp(data)

    dtls_transport._handle_rtp_data = handle_rtp_data


def media_ssrcs(receiver: RTCRtpReceiver) -> list[int]:
    """SSRCs the publisher sends media on (RTX excluded), most recent first."""
    rtx: dict[int, int] = getattr(receiver, "_RTCRtpReceiver__rtx_ssrc", {})
    sources = sorted(receiver.getSynchronizationSources(), key=lambda s: s.timestamp, reverse=True)
    return [s.source for s in sources if s.source not in rtx]


def send_pli(receiver: RTCRtpReceiver) -> bool:
    """Ask the publisher behind ``receiver`` for a keyframe. False if no SSRC is known yet."""
    ssrcs = media_ssrcs(receiver)
    if not ssrcs:
        return False
    task = asyncio.ensure_future(receiver._send_rtcp_pli(ssrcs[0]))
    task.add_done_callback(_log_task_error)
    return True


def _log_failure(what: str, level: int) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback that logs a send task's error (sends are fire and forget)."""

    def done(task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.log(level, "%s failed: %r", what, task.exception())

    return done


_log_task_error = _log_failure("RTCP send", logging.WARNING)
# a copy that cannot go (the connection is closing) is not worth more than debug
_log_send_error = _log_failure("sending a repeated RTP packet", logging.DEBUG)


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    fraction_lost: float  # 0..1 over the last report interval
    packets_lost: int  # cumulative
    jitter: int  # in RTP clock units
    highest_sequence: int = 0  # extended highest sequence number received
    rtt_s: float | None = None  # aiortc's smoothed RTT from LSR/DLSR, once known
    rtt_sample_s: float | None = None  # this block's round trip alone (any recent SR)


class SenderFeedback:
    """Callbacks for the RTCP a subscriber sends about one of our senders."""

    def __init__(
        self,
        on_keyframe_request: Callable[[], None],
        on_remb: Callable[[int, list[int]], None] | None = None,
        on_report: Callable[[ReceiverReport], None] | None = None,
        nack_filter: Callable[[list[int]], list[int]] | None = None,
    ) -> None:
        self.on_keyframe_request = on_keyframe_request
        self.on_remb = on_remb
        self.on_report = on_report
        self.nack_filter = nack_filter  # which of the NACKed sequence numbers to resend


SR_MEMORY = 8  # a sender's SRs whose send times are kept (a block may answer any)


class _SentReports:
    """When a sender's recent SRs left, by their LSR (aiortc keeps only the latest).

    A receiver's block answers the last SR it received: once the round trip
    (queue included) is longer than aiortc's SR interval (0.5-1.5 s), that is
    rarely the sender's latest, and matching only the latest gave a satellite
    viewer one RTT sample every 3-4 s and none at all with EDGE's queue full.
    """

    def __init__(self) -> None:
        self._sent: deque[tuple[int, float]] = deque(maxlen=SR_MEMORY)

    def add(self, lsr: int, sent_at: float) -> None:
        self._sent.append((lsr, sent_at))

    def sent_at(self, lsr: int) -> float | None:
        """When the SR with this LSR left; None if unknown or ambiguous (an idle
        sender's SRs all carry its last packet's NTP time, hence one LSR)."""
        times = [at for sent_lsr, at in self._sent if sent_lsr == lsr]
        return times[0] if len(times) == 1 else None


def tap_sender(sender: RTCRtpSender, feedback: SenderFeedback) -> None:
    """Observe PLI/FIR, REMB and receiver reports arriving for ``sender``.

    aiortc's own handling still runs afterwards (NACK retransmission, RTT stats,
    and for encoded tracks the forced keyframe).
    """
    original = sender._handle_rtcp_packet
    if getattr(original, "_konsilium_tap", False):
        raise HookError("sender is already tapped")
    sent = _SentReports()
    original_send = sender._send_rtcp

    async def send_rtcp(packets: list[Any]) -> None:
        # aiortc sets __lsr / __lsr_time just before it sends each SR
        if any(isinstance(packet, RtcpSrPacket) for packet in packets):
            lsr = getattr(sender, _SENDER_LSR_ATTR, None)
            lsr_time = getattr(sender, _SENDER_LSR_TIME_ATTR, None)
            if lsr is not None and lsr_time is not None:
                sent.add(int(lsr), float(lsr_time))
        await original_send(packets)

    async def handle(packet: Any) -> None:
        if (
            feedback.nack_filter is not None
            and isinstance(packet, RtcpRtpfbPacket)
            and packet.fmt == RTCP_RTPFB_NACK
        ):
            try:
                packet.lost = feedback.nack_filter(list(packet.lost))
            except Exception:
                logger.exception("NACK filter failed")
            if not packet.lost:
                return
        await original(packet)  # first: it updates the sender's RTT from this report
        try:
            _dispatch_feedback(sender, feedback, packet, sent)
        except Exception:  # a bad callback must not break RTCP handling
            logger.exception("sender feedback callback failed")

    handle._konsilium_tap = True  # type: ignore[attr-defined]
    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]
    sender._send_rtcp = send_rtcp  # type: ignore[method-assign]


_SENDER_RTT_ATTR = "_RTCRtpSender__rtt"
_SENDER_LSR_ATTR = "_RTCRtpSender__lsr"
_SENDER_LSR_TIME_ATTR = "_RTCRtpSender__lsr_time"
_SENDER_HISTORY_ATTR = "_RTCRtpSender__rtp_history"
RTX_EXTRA_BYTES = 2  # an RTX packet carries the original sequence number first


class _RepeatingHistory(dict[int, RtpPacket]):
    """aiortc's per-sender packet history that also sends each new packet again.

    aiortc stores every packet it sends (and only those: retransmissions are
    read from it) just before sending it; each copy goes ``n x spacing_s``
    later through the sender's own ``_retransmit``, on the RTX stream when one
    was negotiated, with a fresh abs-send-time so the receiver's delay-based
    estimate sees when it really left.  A receiver keeps whichever arrives
    first; on a link that loses packets at random, losing both copies is rare
    (2 % -> 0.04 %) where a NACK repair would take a round trip.
    """

    def __init__(
        self,
        sender: RTCRtpSender,
        items: dict[int, RtpPacket],
        copies: int,
        spacing_s: float,
        on_copy: Callable[[int], None] | None,
    ) -> None:
        super().__init__(items)
        self.sender = sender
        self.copies = copies
        self.spacing_s = spacing_s
        self.on_copy = on_copy
        self._loop = asyncio.get_running_loop()

    def __setitem__(self, key: int, packet: RtpPacket) -> None:
        super().__setitem__(key, packet)
        for n in range(1, self.copies):
            self._loop.call_later(n * self.spacing_s, self._resend, key, packet)

    def _resend(self, key: int, packet: RtpPacket) -> None:
        if self.get(key) is not packet:
            return  # overwritten: the history wrapped around
        if getattr(self.sender, _SENDER_HISTORY_ATTR) is not self:
            return  # repeats were turned off
        packet.extensions.abs_send_time = (aiortc_clock.current_ntp_time() >> 14) & 0x00FFFFFF
        task = asyncio.ensure_future(self.sender._retransmit(packet.sequence_number))
        task.add_done_callback(_log_send_error)
        if self.on_copy is not None:
            self.on_copy(wire_bytes(len(packet.payload) + RTX_EXTRA_BYTES))


def repeat_packets(
    sender: RTCRtpSender,
    copies: int,
    spacing_s: float = 0.03,
    on_copy: Callable[[int], None] | None = None,
) -> None:
    """Send every packet ``sender`` sends from now on ``copies`` times (1: once, as aiortc).

    ``on_copy(wire_bytes)`` is told of each extra copy as it goes out.  Must run
    on the event loop.
    """
    if copies < 1:
        raise ValueError("copies must be >= 1")
    history = getattr(sender, _SENDER_HISTORY_ATTR)
    if isinstance(history, _RepeatingHistory):
        if copies == 1:
            setattr(sender, _SENDER_HISTORY_ATTR, dict(history))
        else:
            history.copies, history.spacing_s, history.on_copy = copies, spacing_s, on_copy
    elif copies > 1:
        repeating = _RepeatingHistory(sender, history, copies, spacing_s, on_copy)
        setattr(sender, _SENDER_HISTORY_ATTR, repeating)


def repeated_copies(sender: RTCRtpSender) -> int:
    """How many times ``sender`` sends each packet (see :func:`repeat_packets`)."""
    history = getattr(sender, _SENDER_HISTORY_ATTR, None)
    return history.copies if isinstance(history, _RepeatingHistory) else 1


def _dispatch_feedback(
    sender: RTCRtpSender, feedback: SenderFeedback, packet: Any, sent: _SentReports
) -> None:
    ssrc = sender._ssrc
    if isinstance(packet, RtcpPsfbPacket):
        if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            feedback.on_keyframe_request()
        elif packet.fmt == RTCP_PSFB_APP and feedback.on_remb is not None:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if ssrc in ssrcs:
                feedback.on_remb(int(bitrate), list(ssrcs))
    elif isinstance(packet, RtcpRrPacket | RtcpSrPacket) and feedback.on_report is not None:
        for report in packet.reports:
            if report.ssrc == ssrc:
                # aiortc updates __rtt only from a block that answers its latest SR; an
                # idle sender (paused video) keeps an old one, maybe from a better link
                fresh = report.dlsr and report.lsr == getattr(sender, _SENDER_LSR_ATTR, None)
                rtt = getattr(sender, _SENDER_RTT_ATTR, None) if fresh else None
                sample = None
                sent_at = sent.sent_at(report.lsr) if report.dlsr else None
                if sent_at is not None:  # this block's own round trip, unsmoothed
                    sample = time.time() - sent_at - report.dlsr / 65536
                feedback.on_report(
                    ReceiverReport(
                        fraction_lost=report.fraction_lost / 256.0,
                        packets_lost=report.packets_lost,
                        jitter=report.jitter,
                        highest_sequence=report.highest_sequence,
                        rtt_s=float(rtt) if rtt is not None else None,
                        rtt_sample_s=sample if sample is not None and sample >= 0 else None,
                    )
                )


def check_hooks() -> None:
    """Raise HookError naming the first aiortc internal that is missing."""
    handler_names = RTCRtpReceiver._handle_rtp_packet.__code__.co_names
    if _DECODER_QUEUE_ATTR not in handler_names or "put" not in handler_names:
        raise HookError("RTCRtpReceiver._handle_rtp_packet no longer feeds __decoder_queue")
    receive = getattr(RTCRtpReceiver, _ORIGINAL_RECEIVE, None) or RTCRtpReceiver.receive
    if not {_DECODER_QUEUE_ATTR, _DECODER_THREAD_ATTR} <= set(receive.__code__.co_names):
        raise HookError("RTCRtpReceiver.receive no longer hands __decoder_queue to the thread")
    if _JITTER_BUFFER_ATTR not in RTCRtpReceiver.__init__.__code__.co_names:
        raise HookError("RTCRtpReceiver no longer keeps __jitter_buffer")
    for name in ("_remove_frame", "remove"):
        if not callable(getattr(JitterBuffer, name, None)):
            raise HookError(f"aiortc JitterBuffer.{name} is gone")
    worker = getattr(_receiver_module, "decoder_worker", None)
    if worker is None or "get" not in worker.__code__.co_names:
        raise HookError("aiortc's decoder_worker no longer reads its input queue with get()")
    if "_queue" not in _receiver_module.RemoteStreamTrack.__init__.__code__.co_names:
        raise HookError("RemoteStreamTrack no longer keeps an asyncio _queue")
    if not callable(getattr(RTCRtpReceiver, "_send_rtcp_pli", None)):
        raise HookError("RTCRtpReceiver._send_rtcp_pli is gone: keyframe requests cannot work")
    if not callable(getattr(RTCRtpSender, "_handle_rtcp_packet", None)):
        raise HookError("RTCRtpSender._handle_rtcp_packet is gone: feedback cannot be observed")
    init_names = RTCRtpReceiver.__init__.__code__.co_names
    if "_RTCRtpReceiver__rtx_ssrc" not in init_names and "__rtx_ssrc" not in init_names:
        raise HookError("RTCRtpReceiver no longer keeps __rtx_ssrc")
    from aiortc.rtcdtlstransport import RTCDtlsTransport

    recv_names = RTCDtlsTransport._recv_next.__code__.co_names
    if not {"_rx_srtp", "unprotect", "_handle_rtp_data"} <= set(recv_names):
        raise HookError("RTCDtlsTransport._recv_next no longer uses _rx_srtp/_handle_rtp_data")
    if _DTLS_RX_PACKETS_ATTR not in RTCDtlsTransport._recv_next.__code__.co_names:
        raise HookError("RTCDtlsTransport no longer counts __rx_packets: liveness is blind")
    for name in ("current_ntp_time", "current_ms"):
        if not callable(getattr(aiortc_clock, name, None)):
            raise HookError(f"aiortc.clock.{name} is gone: the fast clock cannot replace it")
    from aioice.ice import Connection as IceConnection

    consent = IceConnection.query_consent.__code__
    if "request" not in consent.co_names or 0 not in consent.co_consts:
        raise HookError("aioice query_consent no longer sends zero-retransmission requests")
    if not callable(getattr(StunProtocol, "connection_made", None)):
        raise HookError("aioice StunProtocol.connection_made is gone: buffers cannot be sized")
    if _SENDER_HISTORY_ATTR not in RTCRtpSender._run_rtp.__code__.co_names or not callable(
        getattr(RTCRtpSender, "_retransmit", None)
    ):
        raise HookError("RTCRtpSender no longer keeps __rtp_history for _retransmit")
    if not {_SENDER_RTT_ATTR, _SENDER_LSR_ATTR, _SENDER_LSR_TIME_ATTR} <= set(
        RTCRtpSender._handle_rtcp_packet.__code__.co_names
    ):
        raise HookError("RTCRtpSender no longer keeps __rtt from receiver reports")
    rtcp_names = RTCRtpSender._run_rtcp.__code__.co_names
    if not {_SENDER_LSR_ATTR, _SENDER_LSR_TIME_ATTR, "_send_rtcp"} <= set(rtcp_names):
        raise HookError("RTCRtpSender._run_rtcp no longer sets __lsr before _send_rtcp")
    if "audio_level" not in RTCRtpSender._run_rtp.__code__.co_names:
        raise HookError("RTCRtpSender no longer writes RTCEncodedFrame.audio_level")
    sender_names = RTCRtpSender._next_encoded_frame.__code__.co_names
    if "pack" not in sender_names:
        raise HookError("RTCRtpSender no longer packs pre-encoded packets")
