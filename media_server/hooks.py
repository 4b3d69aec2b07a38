"""Every use of aiortc private API in Konsilium, in one module.

aiortc 1.16 has no public seam for forwarding media without decoding it, for
asking a publisher for a keyframe, or for reading the RTCP feedback that a
subscriber sends to one of our senders.  The seams used here:

* ``aiortc.rtcrtpreceiver.get_decoder`` — the module global that the
  receiver's decoder thread calls; replaced so that "decoding" a reassembled
  frame yields a :class:`MediaPacket` (the remote track becomes a packet stream).
* ``JitterFrame.data`` / ``.timestamp`` — what the decoder thread hands over.
* ``RTCRtpReceiver._send_rtcp_pli(ssrc)`` — sends a PLI to the publisher.
* ``RTCRtpReceiver._RTCRtpReceiver__rtx_ssrc`` — RTX SSRCs, to exclude them.
* ``RTCRtpSender._handle_rtcp_packet`` — the per-sender RTCP entry point that
  the DTLS transport looks up on the instance for every packet; wrapped per
  instance to observe PLI/FIR, REMB and receiver reports.
* ``RTCRtpSender._ssrc`` — the sender's media SSRC.

``check_hooks()`` fails loudly when any of these is gone; a unit test calls it
and an integration test proves the whole path with real media.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import aiortc.rtcrtpreceiver as _receiver_module
from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    unpack_remb_fci,
)

from .packet import MediaPacket, is_keyframe

logger = logging.getLogger(__name__)

PASSTHROUGH_MIME_TYPES = frozenset({"video/vp8", "video/h264", "audio/opus"})


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


@dataclass
class _PassthroughState:
    original: Callable[[Any], Any]


_STATE_ATTR = "_konsilium_passthrough"
_GET_DECODER = "get_decoder"  # the module global decoder_worker looks up


def install_passthrough() -> None:
    """Make every RTCRtpReceiver in this process deliver MediaPackets instead of frames.

    Idempotent. Codecs other than VP8/H.264/Opus keep aiortc's real decoder.
    """
    if getattr(_receiver_module, _STATE_ATTR, None) is not None:
        return
    original: Callable[[Any], Any] = getattr(_receiver_module, _GET_DECODER)

    def get_decoder(codec: Any) -> Any:
        mime = str(codec.mimeType).lower()
        if mime in PASSTHROUGH_MIME_TYPES:
            return PassthroughDecoder(mime, int(codec.clockRate))
        return original(codec)

    setattr(_receiver_module, _STATE_ATTR, _PassthroughState(original))
    setattr(_receiver_module, _GET_DECODER, get_decoder)


def uninstall_passthrough() -> None:
    state: _PassthroughState | None = getattr(_receiver_module, _STATE_ATTR, None)
    if state is None:
        return
    setattr(_receiver_module, _GET_DECODER, state.original)
    setattr(_receiver_module, _STATE_ATTR, None)


def passthrough_installed() -> bool:
    return getattr(_receiver_module, _STATE_ATTR, None) is not None


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


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("RTCP send failed: %r", task.exception())


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    fraction_lost: float  # 0..1 over the last report interval
    packets_lost: int  # cumulative
    jitter: int  # in RTP clock units


class SenderFeedback:
    """Callbacks for the RTCP a subscriber sends about one of our senders."""

    def __init__(
        self,
        on_keyframe_request: Callable[[], None],
        on_remb: Callable[[int], None] | None = None,
        on_report: Callable[[ReceiverReport], None] | None = None,
    ) -> None:
        self.on_keyframe_request = on_keyframe_request
        self.on_remb = on_remb
        self.on_report = on_report


def tap_sender(sender: RTCRtpSender, feedback: SenderFeedback) -> None:
    """Observe PLI/FIR, REMB and receiver reports arriving for ``sender``.

    aiortc's own handling still runs afterwards (NACK retransmission, RTT stats,
    and for encoded tracks the forced keyframe).
    """
    original = sender._handle_rtcp_packet
    if getattr(original, "_konsilium_tap", False):
        raise HookError("sender is already tapped")

    async def handle(packet: Any) -> None:
        try:
            _dispatch_feedback(sender, feedback, packet)
        except Exception:  # a bad callback must not break RTCP handling
            logger.exception("sender feedback callback failed")
        await original(packet)

    handle._konsilium_tap = True  # type: ignore[attr-defined]
    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


def _dispatch_feedback(sender: RTCRtpSender, feedback: SenderFeedback, packet: Any) -> None:
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
                feedback.on_remb(int(bitrate))
    elif isinstance(packet, RtcpRrPacket | RtcpSrPacket) and feedback.on_report is not None:
        for report in packet.reports:
            if report.ssrc == ssrc:
                feedback.on_report(
                    ReceiverReport(
                        fraction_lost=report.fraction_lost / 256.0,
                        packets_lost=report.packets_lost,
                        jitter=report.jitter,
                    )
                )


def check_hooks() -> None:
    """Raise HookError naming the first aiortc internal that is missing."""
    if not callable(getattr(_receiver_module, "get_decoder", None)):
        raise HookError("aiortc.rtcrtpreceiver.get_decoder is gone: passthrough cannot work")
    worker = getattr(_receiver_module, "decoder_worker", None)
    if worker is None or "get_decoder" not in worker.__code__.co_names:
        raise HookError("aiortc's decoder_worker no longer calls get_decoder")
    if not callable(getattr(RTCRtpReceiver, "_send_rtcp_pli", None)):
        raise HookError("RTCRtpReceiver._send_rtcp_pli is gone: keyframe requests cannot work")
    if not callable(getattr(RTCRtpSender, "_handle_rtcp_packet", None)):
        raise HookError("RTCRtpSender._handle_rtcp_packet is gone: feedback cannot be observed")
    init_names = RTCRtpReceiver.__init__.__code__.co_names
    if "_RTCRtpReceiver__rtx_ssrc" not in init_names and "__rtx_ssrc" not in init_names:
        raise HookError("RTCRtpReceiver no longer keeps __rtx_ssrc")
    sender_names = RTCRtpSender._next_encoded_frame.__code__.co_names
    if "pack" not in sender_names:
        raise HookError("RTCRtpSender no longer packs pre-encoded packets")
