"""Subscriber connection: the SFU offers everyone else's tracks to one participant.

One offerer (the server), serialised negotiations, and transceiver reuse: a
transceiver freed by a departed track is rebound to the next track of the same
kind without renegotiation, which keeps the SDP small in long councils.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription

from . import hooks
from .adaptation import LadderPool, SubscriberAdaptation
from .allocator import Choice
from .audiomix import AudioMixer
from .downtrack import DownTrack
from .errors import BadSdp, NegotiationError
from .forwarder import Forwarder, TrackInfo
from .rtc import MAX_SDP_BYTES, prefer_forwardable_codecs

logger = logging.getLogger(__name__)


class SubscriberEvents(Protocol):
    """How the subscriber connection talks to its client (implemented by signalling)."""

    async def subscribe_offer(self, sdp: str, tracks: list[dict[str, str]]) -> None: ...

    async def track_published(self, track: dict[str, str]) -> None: ...

    async def track_unpublished(self, track: dict[str, str]) -> None: ...


class LayerEvents(Protocol):
    """Optional: told when adaptation changes what a video track carries."""

    async def video_layer(self, track: dict[str, str], layer: str, reason: str) -> None: ...


class AudioEvents(Protocol):
    """Optional: told when the subscriber's audio moves to a mix or back to the originals."""

    async def audio_mode(self, state: dict[str, Any]) -> None: ...


@dataclass
class Slot:
    """One sendonly transceiver and its DownTrack, possibly carrying nothing."""

    kind: str
    downtrack: DownTrack
    transceiver: RTCRtpTransceiver
    info: TrackInfo | None = None
    forwarder: Forwarder | None = None
    negotiated: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def mid(self) -> str | None:
        mid = self.transceiver.mid
        return None if mid is None else str(mid)


class SubscriberConnection:
    def __init__(
        self,
        participant_id: str,
        config: RTCConfiguration,
        events: SubscriberEvents,
        ladders: LadderPool | None = None,
        mixer: AudioMixer | None = None,
    ):
        self.participant_id = participant_id
        self._events = events
        self.adaptation = (
            SubscriberAdaptation(
                participant_id, ladders, self._layer_changed, mixer, self._audio_changed
            )
            if ladders is not None
            else None
        )
        self._pc = RTCPeerConnection(config)
        self._slots: list[Slot] = []
        self._lock = asyncio.Lock()
        self._awaiting_answer = False
        self._renegotiate = False
        self._closed = False
        self._speaker: str | None = None  # the room's active speaker, as last told
        self._adapt_lock = asyncio.Lock()  # one adaptation step at a time
        self._fall_step: asyncio.Task[None] | None = None
        if self.adaptation is not None:
            self.adaptation.on_fall = self._adapt_soon

    def __repr__(self) -> str:
        return f"SubscriberConnection({self.participant_id})"

    @property
    def slots(self) -> list[Slot]:
        return list(self._slots)

    def slot_for(self, track_id: str) -> Slot | None:
        for slot in self._slots:
            if slot.info is not None and slot.info.id == track_id:
                return slot
        return None

    async def add(self, forwarder: Forwarder) -> None:
        """Start sending ``forwarder``'s track to this subscriber."""
        async with self._lock:
            if self._closed or self.slot_for(forwarder.info.id) is not None:
                return
            slot = self._free_slot(forwarder.info.kind)
            if slot is None:
                slot = self._new_slot(forwarder.info.kind)
            slot.info = forwarder.info
            slot.forwarder = forwarder
            slot.downtrack.bind(forwarder)
            if slot.mid is not None:
                await self._events.track_published(forwarder.info.to_json(slot.mid))
                return
        await self.negotiate()

    async def remove(self, track_id: str) -> None:
        async with self._lock:
            slot = self.slot_for(track_id)
            if slot is None or slot.info is None:
                return
            info, slot.info = slot.info, None
            forwarder, slot.forwarder = slot.forwarder, None
            slot.downtrack.unbind()
            if self.adaptation is not None:
                self.adaptation.forget(info.id, forwarder, self._slots)
            if slot.mid is not None:
                await self._events.track_unpublished(info.to_json(slot.mid))

    def _free_slot(self, kind: str) -> Slot | None:
        for slot in self._slots:
            if slot.kind == kind and slot.info is None:
                return slot
        return None

    def _new_slot(self, kind: str) -> Slot:
        label = f"{self.participant_id}/{kind}{len(self._slots)}"
        downtrack = DownTrack(kind, label)
        transceiver = self._pc.addTransceiver(downtrack, direction="sendonly")
        prefer_forwardable_codecs(transceiver)
        feedback = (
            self.adaptation.feedback(downtrack)
            if self.adaptation is not None
            else hooks.SenderFeedback(on_keyframe_request=downtrack.request_keyframe)
        )
        hooks.tap_sender(transceiver.sender, feedback)
        slot = Slot(kind, downtrack, transceiver)
        self._slots.append(slot)
        return slot

    async def negotiate(self) -> None:
        """Send an offer covering every slot; queued if one is already outstanding."""
        async with self._lock:
            if self._closed:
                return
            if self._awaiting_answer:
                self._renegotiate = True
                return
            if not any(not s.negotiated for s in self._slots):
                return
            offer = await self._pc.createOffer()
            await self._pc.setLocalDescription(offer)
            self._awaiting_answer = True
            self._renegotiate = False
            tracks = [s.info.to_json(s.mid) for s in self._slots if s.info is not None]
            sdp = str(self._pc.localDescription.sdp)
        logger.debug("%r: offering %d slots", self, len(self._slots))
        await self._events.subscribe_offer(sdp, tracks)

    async def handle_answer(self, sdp: str) -> None:
        if len(sdp.encode()) > MAX_SDP_BYTES:
            raise BadSdp("SDP too large")
        async with self._lock:
            if not self._awaiting_answer:
                raise NegotiationError("no subscribe offer is outstanding")
            try:
                await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            except (ValueError, AssertionError, KeyError, TypeError, AttributeError) as exc:
                raise BadSdp(f"answer could not be applied: {exc}") from exc
            except Exception as exc:
                raise NegotiationError(f"answer could not be applied: {exc}") from exc
            self._awaiting_answer = False
            newly = [s for s in self._slots if not s.negotiated and s.mid is not None]
            for slot in newly:
                slot.negotiated = True
            again = self._renegotiate
        if again:
            await self.negotiate()

    async def adapt(self, speaker: str | None = None) -> None:
        """One adaptation step (called periodically by the room); ``speaker``: the
        active speaker, whose camera is served first."""
        self._speaker = speaker
        async with self._adapt_lock:
            if self.adaptation is not None and not self._closed:
                await self.adaptation.tick(self._slots, speaker=speaker)

    def _adapt_soon(self) -> None:
        """The estimate fell: one adaptation step now, not at the room's next one."""
        if self._closed or (self._fall_step is not None and not self._fall_step.done()):
            return  # falls of one RTCP packet share a step
        self._fall_step = asyncio.get_running_loop().create_task(self._fall_adapt())

    async def _fall_adapt(self) -> None:
        try:
            async with self._adapt_lock:
                if self.adaptation is not None and not self._closed:
                    await self.adaptation.react(self._slots, speaker=self._speaker)
        except Exception:
            logger.exception("%r: adaptation after a fall failed", self)

    async def _layer_changed(self, info: TrackInfo, mid: str | None, choice: Choice) -> None:
        video_layer = getattr(self._events, "video_layer", None)
        if video_layer is not None:
            await video_layer(info.to_json(mid), choice.layer, choice.reason)

    async def _audio_changed(self, state: dict[str, Any]) -> None:
        audio_mode = getattr(self._events, "audio_mode", None)
        if audio_mode is not None:
            await audio_mode(state)

    def packets_received(self) -> int:
        """Packets (RTCP reports, mostly) that arrived from the subscriber."""
        return hooks.packets_received(self._pc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fall_step is not None:
            self._fall_step.cancel()
        if self.adaptation is not None:
            self.adaptation.close(self._slots)
        for slot in self._slots:
            slot.info = None
            slot.downtrack.stop()
        await self._pc.close()

    @property
    def connection_state(self) -> str:
        return str(self._pc.connectionState)
