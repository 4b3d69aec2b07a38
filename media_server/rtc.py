"""Peer-connection configuration shared by the SFU and the bot."""

from __future__ import annotations

from collections.abc import Iterable

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCRtpCodecCapability,
    RTCRtpReceiver,
    RTCRtpTransceiver,
)
from aiortc.sdp import SessionDescription

from .errors import BadSdp

MAX_SDP_BYTES = 64 * 1024


def rtc_configuration(ice_urls: Iterable[str] = ()) -> RTCConfiguration:
    """Explicit ICE servers: an empty list means host candidates only.

    aiortc falls back to a public STUN server when ``iceServers`` is None; the
    embedded default must not talk to the internet, so it is never None here.
    """
    servers = [RTCIceServer(urls=url) for url in ice_urls]
    return RTCConfiguration(iceServers=servers, bundlePolicy="max-bundle")  # type: ignore[arg-type]


def ice_servers_json(ice_urls: Iterable[str]) -> list[dict[str, str]]:
    return [{"urls": url} for url in ice_urls]


def preferred_codecs(kind: str) -> list[RTCRtpCodecCapability]:
    """VP8 (+RTX) for video and Opus for audio: what the SFU forwards untouched."""
    capabilities = RTCRtpReceiver.getCapabilities(kind)
    if capabilities is None:
        return []
    wanted = ("video/vp8", "video/rtx") if kind == "video" else ("audio/opus",)
    return [c for c in capabilities.codecs if c.mimeType.lower() in wanted]


def prefer_forwardable_codecs(transceiver: RTCRtpTransceiver) -> None:
    transceiver.setCodecPreferences(preferred_codecs(transceiver.kind))


def offered_media(sdp: str) -> list[tuple[str, str]]:
    """(kind, mid) of each audio/video m-section of an SDP; BadSdp if unparsable."""
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise BadSdp("SDP too large")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc raises assorted errors on garbage
        raise BadSdp(f"SDP could not be parsed: {type(exc).__name__}") from exc
    media = [(m.kind, m.rtp.muxId) for m in description.media if m.kind in ("audio", "video")]
    if not media:
        raise BadSdp("SDP has no audio or video section")
    return media
