"""AudioMode: puts one subscriber's audio on the originals or on one mix.

The :class:`~media_server.allocator.AudioRule` decides (an
:class:`~media_server.allocator.AudioPlan`); this applies it to the
subscriber's audio slots without renegotiation:

* **mix**: the room's :class:`~media_server.audiomix.AudioMixer` gives the
  :class:`~media_server.audiomix.Mix` of every audio track the subscriber
  watches, in the plan's format; one audio DownTrack (the *carrier*, kept as
  long as its track is watched) is bound to it through a :class:`MixSource`
  (each packet sent ``copies`` times), and every other audio DownTrack is
  unbound: it carries nothing.
  A change of inputs, format or copies binds the carrier to the new mix
  (DownTrack.bind rebases timestamps: one continuous timeline) and then
  releases the old one.
* **originals**: every audio DownTrack is bound back to its own track.

The subscriber's own tracks are never in its mix: a subscriber does not watch
itself, and :meth:`AudioMode.apply` skips them anyway.  Each change is told to
the client (``audio_mode``) with the carrier's mid and the mixed tracks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .allocator import AUDIO_MIX, AUDIO_ORIGINALS, AudioPlan, Layer
from .audiomix import MIX_FORMATS, AudioMixer, Mix, MixFormat, PacketSink
from .packet import MediaPacket

if TYPE_CHECKING:
    from .subscriber import Slot

logger = logging.getLogger(__name__)

MIX_LAYERS: tuple[Layer, ...] = tuple(Layer(f.name, f.wire_bps) for f in MIX_FORMATS)
_FORMATS: dict[str, MixFormat] = {f.name: f for f in MIX_FORMATS}

AudioListener = Callable[[dict[str, Any]], Awaitable[None]]
COPY_SPACING_S = 0.02  # a repeated packet follows the first one this much later


class MixSource:
    """What one viewer's DownTrack binds to: a Mix, each packet sent ``copies`` times.

    On a lossy link one mixed stream is cheap enough to send twice: a copy goes
    ``spacing_s`` after the first (same timestamp, next sequence number), and a
    receiver's jitter buffer keeps whichever arrives first (libwebrtc's NetEq
    drops a packet whose timestamp it already has).
    """

    def __init__(self, mix: Mix, copies: int = 1, spacing_s: float = COPY_SPACING_S) -> None:
        if copies < 1:
            raise ValueError("copies must be >= 1")
        self.mix = mix
        self.copies = copies
        self._spacing = spacing_s
        self._sinks: list[PacketSink] = []

    def __repr__(self) -> str:
        return f"MixSource({self.mix!r} x{self.copies})"

    def attach(self, sink: PacketSink) -> None:
        if sink not in self._sinks:
            self._sinks.append(sink)
        self.mix.attach(self)

    def detach(self, sink: PacketSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)
        if not self._sinks:
            self.mix.detach(self)

    def request_keyframe(self) -> None:
        """Audio: nothing to do."""

    def push(self, packet: MediaPacket) -> None:
        for sink in tuple(self._sinks):
            sink.push(packet)
        if self.copies > 1 and self._sinks:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            for n in range(1, self.copies):
                if loop is None:
                    self._repeat(packet)
                else:
                    loop.call_later(n * self._spacing, self._repeat, packet)

    def _repeat(self, packet: MediaPacket) -> None:
        for sink in tuple(self._sinks):
            sink.push(packet)


class AudioMode:
    """One subscriber's audio: which mix (if any) it receives and on which transceiver."""

    def __init__(
        self,
        participant_id: str,
        mixer: AudioMixer,
        on_change: AudioListener | None = None,
    ) -> None:
        self.participant_id = participant_id
        self.mixer = mixer
        self._on_change = on_change
        self.state: dict[str, Any] = {"mode": AUDIO_ORIGINALS}  # as applied (stats, client)
        self.carrier: Slot | None = None
        self._mix: Mix | None = None
        self._source: MixSource | None = None
        self._key: tuple[frozenset[tuple[str, int]], str, int] | None = None
        self._dirty = False

    def __repr__(self) -> str:
        return f"AudioMode({self.participant_id})"

    @property
    def mixing(self) -> bool:
        return self._mix is not None

    def watched(self, slots: Sequence[Slot]) -> list[Slot]:
        """The audio slots that carry someone else's published audio."""
        return [
            s
            for s in slots
            if s.kind == "audio"
            and s.info is not None
            and s.forwarder is not None
            and s.info.participant_id != self.participant_id
        ]

    async def apply(self, plan: AudioPlan, slots: Sequence[Slot]) -> None:
        audio = self.watched(slots)
        if not plan.mixing or plan.layer is None or not audio:
            if self._mix is not None:
                self._to_originals(audio)
                await self._tell(audio)
            return
        fmt = _FORMATS[plan.layer.name]
        inputs = {s.info.id: s.forwarder for s in audio if s.info and s.forwarder}
        # a re-published track (a reconnect) has the same id but a new Forwarder
        key = (frozenset((t, id(f)) for t, f in inputs.items()), fmt.name, plan.copies)
        carrier = self.carrier if self.carrier in audio else None
        changed = self._dirty
        if key != self._key or self._source is None:
            mix = self.mixer.acquire(inputs, fmt)
            source = MixSource(mix, plan.copies)
            old, self._mix, self._source, self._key = self._mix, mix, source, key
            carrier = carrier or _pick_carrier(audio)
            carrier.downtrack.bind(source)
            if old is not None:
                self.mixer.release(old)
            changed = True
        elif carrier is None:
            carrier = _pick_carrier(audio)
            carrier.downtrack.bind(self._source)
            changed = True
        self.carrier = carrier
        for slot in audio:
            if slot is not carrier and slot.downtrack.bound:
                slot.downtrack.unbind()  # e.g. a track added since: it is in the mix now
        if changed:
            logger.info("%r: mix of %d tracks (%s x%d)", self, len(inputs), fmt.name, plan.copies)
            await self._tell(audio, fmt, plan.copies)

    def track_removed(self, slots: Sequence[Slot]) -> None:
        """A watched track is gone: if it was the carrier's, move the mix to another slot now.

        The mix itself (which still lists the departed input, now silent) is
        rebuilt at the next :meth:`apply`.
        """
        if self._source is None or self.carrier is None or self.carrier.info is not None:
            return
        audio = self.watched(slots)
        self.carrier = _pick_carrier(audio) if audio else None
        if self.carrier is not None:
            self.carrier.downtrack.bind(self._source)
        self._dirty = True

    def _to_originals(self, audio: Sequence[Slot]) -> None:
        for slot in audio:
            assert slot.forwarder is not None
            slot.downtrack.bind(slot.forwarder)
        mix, self._mix, self._source, self._key, self.carrier = self._mix, None, None, None, None
        if mix is not None:
            self.mixer.release(mix)
        logger.info("%r: back to the %d originals", self, len(audio))

    async def _tell(
        self, audio: Sequence[Slot], fmt: MixFormat | None = None, copies: int = 1
    ) -> None:
        self._dirty = False
        if fmt is None or self.carrier is None:
            self.state = {"mode": AUDIO_ORIGINALS, "server_time": time.time()}
        else:
            self.state = {
                "mode": AUDIO_MIX,
                "mid": self.carrier.mid,
                "tracks": [s.info.to_json(s.mid) for s in audio if s.info is not None],
                "format": fmt.name,
                "bitrate": fmt.bitrate,
                "frame_ms": fmt.frame_ms,
                "copies": copies,
                "server_time": time.time(),
            }
        if self._on_change is not None:
            await self._on_change(dict(self.state))

    def close(self) -> None:
        mix, self._mix, self._source, self._key, self.carrier = self._mix, None, None, None, None
        if mix is not None:
            self.mixer.release(mix)


def _pick_carrier(audio: Sequence[Slot]) -> Slot:
    """The first negotiated audio slot (its mid is known to the client), else the first."""
    return next((s for s in audio if s.mid is not None), audio[0])
