"""Publisher connection: the client offers its tracks, the SFU answers and forwards them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from . import hooks
from .errors import BadSdp, NegotiationError
from .forwarder import Forwarder, TrackInfo
from .rtc import offered_media, prefer_forwardable_codecs

logger = logging.getLogger(__name__)

SOURCES_BY_KIND = {"video": ("camera", "screen"), "audio": ("microphone",)}


class PublisherConnection:
    """One participant's upstream peer connection and the Forwarders of its tracks."""

    def __init__(
        self,
        participant_id: str,
        config: RTCConfiguration,
        on_published: Callable[[Forwarder], None],
        on_unpublished: Callable[[Forwarder], None],
        on_failed: Callable[[], None],
    ) -> None:
        self.participant_id = participant_id
        self._config = config
        self._on_published = on_published
        self._on_unpublished = on_unpublished
        self._on_failed = on_failed
        self._pc: RTCPeerConnection | None = None
        self._lock = asyncio.Lock()
        self.forwarders: dict[str, Forwarder] = {}  # by mid
        self._closed = False

    def __repr__(self) -> str:
        return f"PublisherConnection({self.participant_id})"

    async def handle_offer(self, sdp: str, sources: Mapping[str, str]) -> str:
        """Apply the client's offer; returns the answer SDP. Raises BadSdp."""
        media = offered_media(sdp)
        async with self._lock:
            if self._closed:
                raise NegotiationError("connection closed")
            pc = self._pc
            if pc is None:
                pc = self._pc = RTCPeerConnection(self._config)
                pc.on("connectionstatechange", self._on_state_change)
            known = {t.mid for t in pc.getTransceivers() if t.mid is not None}
            for kind, mid in media:
                if mid not in known:
                    # pre-created so the answer carries only codecs we forward untouched
                    transceiver = pc.addTransceiver(kind, direction="recvonly")
                    prefer_forwardable_codecs(transceiver)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)
            except (ValueError, AssertionError, KeyError, TypeError, AttributeError) as exc:
                raise BadSdp(f"offer could not be negotiated: {exc}") from exc
            except Exception as exc:  # aiortc's OperationError/InvalidStateError
                raise NegotiationError(f"offer could not be negotiated: {exc}") from exc
            for transceiver in pc.getTransceivers():
                track = transceiver.receiver.track
                if transceiver.mid is None or track is None or transceiver.mid in self.forwarders:
                    continue
                self._start_forwarder(
                    transceiver.mid, transceiver.kind, track, transceiver, sources
                )
            return str(pc.localDescription.sdp)

    def _start_forwarder(
        self,
        mid: str,
        kind: str,
        track: MediaStreamTrack,
        transceiver: object,
        sources: Mapping[str, str],
    ) -> None:
        allowed = SOURCES_BY_KIND.get(kind, ())
        source = sources.get(mid)
        if source not in allowed:
            source = allowed[0] if allowed else kind
        # a second track of the same source gets a distinct id
        track_id = f"{self.participant_id}:{source}"
        if any(f.info.id == track_id for f in self.forwarders.values()):
            track_id = f"{track_id}:{mid}"
        info = TrackInfo(track_id, self.participant_id, kind, source)
        receiver = transceiver.receiver  # type: ignore[attr-defined]
        forwarder = Forwarder(info, track, receiver, on_ended=self._forwarder_ended)
        self.forwarders[mid] = forwarder
        forwarder.start()
        logger.info("%r: publishing %s (%s) on mid %s", self, track_id, kind, mid)
        self._on_published(forwarder)

    def _forwarder_ended(self, forwarder: Forwarder) -> None:
        for mid, f in list(self.forwarders.items()):
            if f is forwarder:
                del self.forwarders[mid]
        self._on_unpublished(forwarder)

    async def _on_state_change(self) -> None:
        pc = self._pc
        if pc is not None and pc.connectionState == "failed" and not self._closed:
            logger.info("%r: peer connection failed", self)
            self._on_failed()

    def packets_received(self) -> int:
        """Packets that arrived from the publisher (a sign its link is alive)."""
        return hooks.packets_received(self._pc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        forwarders = list(self.forwarders.values())
        for forwarder in forwarders:
            await forwarder.close()
        pc, self._pc = self._pc, None
        if pc is not None:
            await pc.close()
