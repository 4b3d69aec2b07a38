"""Per-viewer adaptation: estimate → allocator → original / ladder rung / paused.

Wires the pure pieces (:mod:`estimator`, :mod:`allocator`) to the media path:

* :class:`LadderPool` — the room's :class:`~media_server.ladder.Ladder` per
  published video, fed by the track's Forwarder only while some rung is in use;
  :class:`RungSource` makes a rung look like a DownTrack source.
* :class:`SubscriberAdaptation` — one per subscriber connection: collects the
  subscriber's REMB, receiver reports and delivered bytes into a
  BandwidthEstimator, and every :data:`ADAPT_INTERVAL_S` (and at once when the
  estimate falls, through :attr:`SubscriberAdaptation.on_fall`) asks the
  Allocator what each watched video should get, then switches the DownTracks
  (make before break, on a keyframe) and tells the client.

Without evidence of congestion the estimate starts at its ceiling: a viewer on a
good link is never moved off the original stream just because aiortc cannot
probe.  Audio is never paused and is reserved first: each tick the
:class:`~media_server.allocator.AudioRule` chooses between the audio originals
and one mix of them (:mod:`audiomode`, :mod:`audiomix`) for viewers whose
estimate cannot carry every original, and the videos share what is left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec

from . import hooks
from .allocator import (
    ORIGINAL,
    PAUSED,
    PRIORITY_OTHER,
    PRIORITY_SCREEN,
    PRIORITY_SPEAKER,
    Allocator,
    AudioRule,
    Choice,
    Layer,
    VideoCandidate,
)
from .audiomix import AudioMixer
from .audiomode import MIX_LAYERS, AudioListener, AudioMode
from .downtrack import DownTrack
from .estimator import BandwidthEstimator, EstimatorConfig
from .forwarder import Forwarder, TrackInfo
from .ladder import DEFAULT_RUNGS, RUNG_MAX_FRACTION, Ladder, Rung, usable_rungs
from .packet import wire_bps
from .queuedelay import QueueDelay
from .repeat import VideoRepeat
from .stepmemory import StepMemory

if TYPE_CHECKING:
    from .subscriber import Slot

logger = logging.getLogger(__name__)

ADAPT_INTERVAL_S = 0.5
AUDIO_BPS = 56_000  # Opus ~32 kbit/s + 50 packets/s x 66 B of headers: until measured
AUDIO_MIN_BPS = 16_000  # a muted or silent (DTX) microphone still gets this much room
MIN_ORIGINAL_BPS = 150_000  # before the original's rate is measured
RELEASE_DELAY_S = 2.0  # keep the previous rung running until the switch has happened
# a REMB below this share of the delivered rate means a queue (AIMD backs off to 0.85x)
REMB_CONGESTION_FRACTION = 0.9
REMB_FALL = 0.97  # ... and only a REMB lower than the one before is a congestion signal
VIDEO_RATE_WINDOW_S = 1.0
REMB_FRESH_S = 3.0  # per-stream REMBs older than this no longer count
# libwebrtc's receiver reports its start value (~300 kbit/s) until it has
# measured for 5 s; aiortc's sends nothing for ~3 s
REMB_WARMUP_S = 6.0
MAX_REPORT_PACKETS = 10_000  # a report covering more is not about this stream's last interval
# a stream idle this long (paused video, audio unbound while mixing): its next report is stale
STALE_AFTER_IDLE_S = 1.0
RETRANSMIT_SHARE = 0.15  # of the estimate, for resending lost packets
RETRANSMIT_PACKET_BYTES = 1000
RISE_LIMIT_FACTOR = 1.5  # on a lossy long-RTT link the estimate rises to at most this x delivered
RISE_LIMIT_ADD_BPS = 10_000
SUSPECT_REMB_S = 2.0  # a REMB fall is followed if round trips show a queue this soon
REMB_STEP = 0.85  # a receiver's AIMD backs off to this x what it received ...
SMALL_QUEUE_DEPTH = 2.0  # ... so while the queue is under this x its threshold, no deeper
LINK_DROP_SHARE = 0.3  # unless the REMB is under this x what we send: the link dropped
LOSS_SMOOTHING_PACKETS = 500  # a report block weighs (packets it covers) / this, up to 0.3
HEAVY_LOSS_PACKETS = 20  # a block this big losing > 10 % (or such a judged loss): a queue overflows
# the estimate on a new, shorter path (libwebrtc's start value)
NEW_PATH_START_BPS = 300_000
# Start at the ceiling: a viewer is moved off the original only on evidence.
# Rise below 5 % loss (not 2 %): satellite and EDGE links lose 2-3 % at random,
# which would otherwise hold the estimate forever; overshooting a real queue
# shows up as far more than the 10 % that cuts.
# After a loss cut, a clean link climbs back to 70 % of its REMB at +50 %/s
# (aiortc's per-stream REMB is a ceiling of 1.5x what it receives, not capacity).
ESTIMATOR = EstimatorConfig(
    initial_bps=20_000_000,
    ceiling_bps=20_000_000,
    loss_increase_below=0.05,
    remb_recovery_fraction=0.7,
    delivered_floor_share=0.9,
    judge_loss_packets=60,
)


class RungSource:
    """A ladder rung seen as a DownTrack source."""

    def __init__(self, ladder: Ladder, rung: str) -> None:
        self.ladder = ladder
        self.rung = rung

    def __repr__(self) -> str:
        return f"RungSource({self.ladder.track_id}/{self.rung})"

    def attach(self, sink: Any) -> None:
        self.ladder.attach(self.rung, sink)

    def detach(self, sink: Any) -> None:
        self.ladder.detach(self.rung, sink)

    def request_keyframe(self) -> None:
        self.ladder.request_keyframe(self.rung)


class LadderPool:
    """The room's ladders, one per published video, decoding only while needed."""

    def __init__(self, rungs: tuple[Rung, ...] = DEFAULT_RUNGS) -> None:
        self._rungs = rungs
        self._ladders: dict[str, Ladder] = {}
        self._sources: dict[tuple[str, str], RungSource] = {}
        self._feeding: set[str] = set()

    def rungs_for(
        self, forwarder: Forwarder, original_bps: int, keep: str | None = None
    ) -> tuple[Rung, ...]:
        """The rungs worth offering below ``forwarder``'s original (see ``usable_rungs``)."""
        size = forwarder.frame_size
        if size is None:
            return ()
        return usable_rungs(size[0], size[1], original_bps, self._rungs, keep=keep)

    def acquire(self, forwarder: Forwarder, rung: str) -> RungSource:
        track_id = forwarder.info.id
        ladder = self._ladders.get(track_id)
        if ladder is None:
            loop = asyncio.get_running_loop()

            def ask_publisher() -> None:  # called from the ladder's worker thread
                loop.call_soon_threadsafe(forwarder.request_keyframe)

            ladder = Ladder(track_id, self._rungs, loop=loop, request_source_keyframe=ask_publisher)
            self._ladders[track_id] = ladder
        ladder.acquire(rung)
        if track_id not in self._feeding:
            forwarder.attach(ladder)
            self._feeding.add(track_id)
        key = (track_id, rung)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = RungSource(ladder, rung)
        return source

    def release(self, forwarder: Forwarder, rung: str) -> None:
        track_id = forwarder.info.id
        ladder = self._ladders.get(track_id)
        if ladder is None:
            return
        ladder.release(rung)
        if not ladder.active and track_id in self._feeding:
            forwarder.detach(ladder)
            self._feeding.discard(track_id)

    def drop(self, track_id: str) -> None:
        """The track is gone: stop its ladder."""
        ladder = self._ladders.pop(track_id, None)
        self._feeding.discard(track_id)
        for key in [k for k in self._sources if k[0] == track_id]:
            del self._sources[key]
        if ladder is not None:
            ladder.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for track_id, ladder in self._ladders.items():
            s = ladder.stats()
            out[track_id] = {"active": ladder.active_rungs(), "cpu_s": round(s.cpu_s, 3)}
        return out

    def close(self) -> None:
        for track_id in list(self._ladders):
            self.drop(track_id)


LayerListener = Callable[[TrackInfo, str | None, Choice], Awaitable[None]]
_P = ParamSpec("_P")


def priced(candidate: VideoCandidate, copies: int) -> VideoCandidate:
    """``candidate`` with every rung costing ``copies`` times its rate, the original dearest.

    The original is sent once and ranks above all its rungs whatever it measures:
    a rung is offered because the original was measured dearer, and between two
    keyframes its measured rate dips; and a rung sent twice on a lossy long-RTT
    link can cost more than the original sent once, which would freeze there.
    Either way a satellite viewer on 360p was "downgraded" to the original.
    """
    rungs = [
        Layer(layer.name, layer.bitrate * copies)
        for layer in candidate.layers
        if layer.name != ORIGINAL
    ]
    dearest = max((layer.bitrate for layer in rungs), default=0)
    floor = math.ceil(dearest / RUNG_MAX_FRACTION)
    layers = tuple(
        Layer(ORIGINAL, max(layer.bitrate, floor))
        for layer in candidate.layers
        if layer.name == ORIGINAL
    )
    return VideoCandidate(candidate.track_id, candidate.priority, (*layers, *rungs))


class _RembFall(NamedTuple):
    """A REMB fall: ``bps`` in all, ``measured`` its part compared with ``delivered``."""

    bps: int
    measured: int
    delivered: int | None
    at: float


class SubscriberAdaptation:
    """One subscriber's estimate, allocation and the switches that follow."""

    def __init__(
        self,
        label: str,
        pool: LadderPool,
        on_layer: LayerListener | None,
        mixer: AudioMixer | None = None,
        on_audio: AudioListener | None = None,
    ) -> None:
        self.label = label  # the subscriber's participant id
        self.pool = pool
        self.estimator = BandwidthEstimator(ESTIMATOR)
        self.allocator = Allocator()
        self.audio_rule = AudioRule()
        self.video_repeat = VideoRepeat()
        self.queue_delay = QueueDelay()
        self.step_memory = StepMemory()
        self._spend = 0  # what the last allocation's videos cost
        self._decreases_seen = 0
        self._suspect_remb: _RembFall | None = None  # a fall no queue confirmed yet
        self.rembs_unconfirmed = 0
        self.rembs_bounded = 0  # confirmed falls held at one back-off (a small queue)
        self.audio_mode = AudioMode(label, mixer, on_audio) if mixer is not None else None
        self._on_layer = on_layer
        # called when RTCP lowered the estimate: the owner calls react() now (down fast)
        self.on_fall: Callable[[], None] | None = None
        self._loss: float | None = None  # smoothed over the receiver reports
        self._mix_bps: float | None = None  # the mix's carrier, measured on the wire
        self._last_tick: float | None = None
        self.layers: dict[str, str] = {}  # track id -> layer now applied
        self._last_estimate = ESTIMATOR.initial_bps
        self._session_remb: tuple[int, float] | None = None
        self._last_remb: int | None = None  # the last REMB judged (its video part)
        self._remb_covers_audio_at = -REMB_FRESH_S  # when a REMB last listed an audio stream
        self._stream_remb: dict[int, tuple[int, float]] = {}
        self._active_video: set[int] = set()  # video DownTracks that delivered last tick
        self._audio_reserve = 0  # bits/s the subscriber's audio tracks take on the wire
        self._video_delivered: deque[tuple[float, int]] = deque()  # (tick, video bytes)
        self._delivering_since: float | None = None
        self._rtx_tokens = 0.0
        self._rtx_refilled = time.monotonic()
        self.retransmissions_refused = 0
        self._original_bps: dict[str, float] = {}
        self._last_bytes: dict[int, int] = {}
        self._last_packet_bytes: dict[str, tuple[float, int]] = {}
        self._highest_seq: dict[int, int] = {}  # DownTrack -> last report's highest sequence
        self._idle_since: dict[int, float] = {}  # DownTrack -> since when it sends nothing
        self._stale: set[int] = set()  # DownTracks idle long enough: next report is an origin
        self._resumed_at: dict[int, float] = {}  # video DownTrack -> when it left "paused"
        self._repeated: set[int] = set()  # video DownTracks whose packets are sent twice

    def __repr__(self) -> str:
        return f"SubscriberAdaptation({self.label})"

    # -- inputs (from the senders' RTCP taps) ----------------------------------

    def feedback(self, downtrack: DownTrack) -> hooks.SenderFeedback:
        key = id(downtrack)

        def on_remb(bps: int, ssrcs: list[int]) -> None:
            now = time.monotonic()
            if downtrack.kind == "audio":  # the REMB lists this audio stream: it covers audio
                self._remb_covers_audio_at = now
                return
            if len(ssrcs) > 1:  # one REMB for the whole session (libwebrtc)
                self._session_remb = (bps, now)
                # libwebrtc lists the streams it measured: often only video
                covers_audio = now - self._remb_covers_audio_at < REMB_FRESH_S
                total = bps if covers_audio else bps + self._audio_reserve
                self.on_remb(total, now, video_remb=total - self._audio_reserve)
                return
            # one REMB per video stream (aiortc receivers): the total is their sum
            if now - self._resumed_at.get(key, -REMB_WARMUP_S) < REMB_WARMUP_S:
                # a resumed stream's receiver starts again from ~1.5x what it has got so
                # far (a keyframe burst, then a low rung): its start value, not a queue
                self._stream_remb.pop(key, None)
                return
            self._stream_remb[key] = (bps, now)
            fresh = {k for k, (_, at) in self._stream_remb.items() if now - at < REMB_FRESH_S}
            if not self._active_video <= fresh:
                return  # a partial sum would look like congestion
            if self._session_remb is None or now - self._session_remb[1] >= REMB_FRESH_S:
                video = sum(b for b, at in self._stream_remb.values() if now - at < REMB_FRESH_S)
                self.on_remb(video + self._audio_reserve, now, video_remb=video)

        resent: dict[int, float] = {}  # sequence number -> when it was last resent

        def nack_filter(lost: list[int]) -> list[int]:
            return self._allow_retransmissions(resent, lost, time.monotonic())

        def on_report(report: hooks.ReceiverReport) -> None:
            self._on_report(key, report)

        return hooks.SenderFeedback(
            on_keyframe_request=downtrack.request_keyframe,
            on_remb=self._telling_falls(on_remb),
            nack_filter=nack_filter,
            on_report=self._telling_falls(on_report),
        )

    def _telling_falls(self, handler: Callable[_P, None]) -> Callable[_P, None]:
        """``handler``, then :attr:`on_fall` if it lowered the estimate.

        Down fast: a fall is acted on at once, not at the next periodic step
        (up to :data:`ADAPT_INTERVAL_S` later, on every step of a drop's cascade
        of cuts); rises wait for the step and its streak.
        """

        def telling(*args: _P.args, **kwargs: _P.kwargs) -> None:
            before = self.estimator.decreases
            handler(*args, **kwargs)
            if self.estimator.decreases > before and self.on_fall is not None:
                self.on_fall()

        return telling

    def _on_report(self, key: int, report: hooks.ReceiverReport) -> None:
        """Pass a report block on with the number of packets it covers.

        The receiver's extended highest sequence number advances by what it
        expected since its previous report; the first block of a stream only
        sets that origin (it covers an unknown number of packets).  So does the
        first block that advances after the stream was idle (a paused video, an
        audio track while mixing): it also counts, as lost now, the packets a
        congested link dropped before the pause.
        """
        previous = self._highest_seq.get(key)
        self._highest_seq[key] = report.highest_sequence
        if key in self._stale and report.highest_sequence != previous:
            self._stale.discard(key)
            previous = None
        expected = 0 if previous is None else report.highest_sequence - previous
        if not 0 <= expected <= MAX_REPORT_PACKETS:
            expected = 0  # a restarted stream or a bogus report: a new origin
        if expected > 0 and key not in self._repeated:
            # a repeated stream's receiver keeps the first copy: its reports hide the loss
            weight = min(0.3, expected / LOSS_SMOOTHING_PACKETS)
            loss = report.fraction_lost
            self._loss = loss if self._loss is None else self._loss + weight * (loss - self._loss)
        # an idle sender's SRs all carry the NTP time of its last packet, so aiortc
        # matches a block about an older SR to the newest one: too short an RTT
        now = time.monotonic()
        idle = key in self._idle_since
        rtt = None if idle else report.rtt_s
        if rtt is not None and report.rtt_sample_s is not None:
            # aiortc's RTT is smoothed (0.85): after a link change it lags by seconds,
            # and a stale short RTT lets loss cuts compound (they are spaced by it)
            rtt = max(rtt, report.rtt_sample_s)
        self.estimator.on_receiver_report(report.fraction_lost, rtt, now, expected)
        # a full drop-tail queue's round trip is flat too, but it loses what overflows
        heavy = ESTIMATOR.loss_decrease_above
        judged = self.estimator.judged_loss
        if (judged is not None and judged > heavy) or (
            expected >= HEAVY_LOSS_PACKETS and report.fraction_lost > heavy
        ):
            self.queue_delay.heavy_loss(now)
        if not idle and report.rtt_sample_s is not None:
            faster = self.queue_delay.faster_links
            self.queue_delay.add(report.rtt_sample_s, now)
            if self.queue_delay.faster_links > faster:  # a shorter path: start again
                self.estimator.on_new_path(NEW_PATH_START_BPS, now)
                self.step_memory.forget()
                logger.info("%r: a shorter path, the estimate starts again", self)
            suspect = self._suspect_remb
            if suspect is not None and now - suspect.at <= SUSPECT_REMB_S:
                if self.queue_delay.confirms(now):  # the queue showed up after the REMB
                    self._suspect_remb = None
                    self._follow_fall(suspect, now)
            else:
                self._suspect_remb = None

    def _allow_retransmissions(
        self, resent: dict[int, float], lost: list[int], now: float
    ) -> list[int]:
        """Resend a packet at most once per RTT, within a share of the estimate.

        aiortc's receivers repeat every missing sequence number in each NACK and
        aiortc's senders resend everything listed: on a lossy, full link that
        multiplies the load until only repairs flow.  The budget refills at
        RETRANSMIT_SHARE of the estimate (bytes/s, ~1 KB per packet).
        """
        snapshot_rtt = self.estimator.snapshot(now).rtt_s
        spacing = max(snapshot_rtt or 0.2, 0.1)
        budget_rate = RETRANSMIT_SHARE * self.estimator.estimate_bps(now) / 8
        elapsed = now - self._rtx_refilled
        self._rtx_refilled = now
        self._rtx_tokens = min(budget_rate, self._rtx_tokens + elapsed * budget_rate)
        allowed = []
        for seq in lost:
            last = resent.get(seq)
            if last is not None and now - last < spacing:
                continue
            if self._rtx_tokens < RETRANSMIT_PACKET_BYTES:
                self.retransmissions_refused += 1
                continue
            self._rtx_tokens -= RETRANSMIT_PACKET_BYTES
            resent[seq] = now
            allowed.append(seq)
        if len(resent) > 2048:  # forget the oldest half
            for seq in sorted(resent, key=resent.__getitem__)[:1024]:
                del resent[seq]
        return allowed

    def on_remb(self, bps: int, now: float | None = None, video_remb: int | None = None) -> None:
        """Pass on a REMB only when it is evidence.

        A receiver's REMB (aiortc's and libwebrtc's AIMD) rises towards ~1.5x what
        it receives and, on overuse, falls to 0.85x of it.  So a REMB above what we
        deliver but below the estimate is a receiver that has not been shown more
        (following it would ratchet a good viewer down), while a REMB below
        :data:`REMB_CONGESTION_FRACTION` of the delivered rate is its
        delay-based detector seeing a queue: follow it, if it fell (a receiver
        ramping up from its start value is also below what we send).  A REMB at or above the
        estimate only raises the cap.  A fall is followed only if round trips show
        the queue (:mod:`queuedelay`) now or within :data:`SUSPECT_REMB_S`, and
        one queue answers one fall unless it grows: on a link with jitter the
        detectors fire without one, and after a step in delay they fire on.  Until then it is
        ignored (as a ceiling it pinned a recovering viewer: aiortc's REMB wobbles
        by a few % and every dip is a fall).  ``video_remb`` is the video part of
        ``bps``
        (aiortc sends one REMB per video stream, libwebrtc one that often lists
        only the video streams; the audio reserve is added to make ``bps``): it
        is compared with the video we deliver, or audio would hide the overuse.
        """
        now = time.monotonic() if now is None else now
        if self._delivering_since is None or now - self._delivering_since < REMB_WARMUP_S:
            return  # a receiver's first REMBs are its start value, not a measurement
        if video_remb is None:
            measured, delivered = bps, self.estimator.delivered_bps(now)
        else:
            measured, delivered = video_remb, self._video_delivered_bps(now)
        previous, self._last_remb = self._last_remb, measured
        # a receiver still ramping up from its start value is below what we send
        # too, but rising; overuse is a fall
        falling = previous is not None and measured < REMB_FALL * previous
        congested = (
            falling and delivered is not None and measured < REMB_CONGESTION_FRACTION * delivered
        )
        if congested and not self.queue_delay.confirms(now):
            # jitter, not a queue (round trips did not grow): wait for one to show
            self._suspect_remb = _RembFall(bps, measured, delivered, now)
            self.rembs_unconfirmed += 1
        elif congested:
            self._suspect_remb = None
            self._follow_fall(_RembFall(bps, measured, delivered, now), now)
        elif bps >= self.estimator.estimate_bps(now):
            self._suspect_remb = None
            self.estimator.on_remb(bps, now)

    def _follow_fall(self, fall: _RembFall, now: float) -> None:
        """Follow a REMB fall the round trips confirmed: one back-off while the queue is small.

        A receiver's AIMD answers overuse with 0.85x what it received; aiortc's
        REMB also fell to 0.45x of it with one queue sample 90 ms over the floor
        (threshold 87 ms) and the link's queue empty: a satellite viewer's video
        paused and the 8 %/s rise took 9 s to resume it.  So while the queue is
        under :data:`SMALL_QUEUE_DEPTH` thresholds, one fall goes no lower than
        :data:`REMB_STEP` x what was delivered; a growing queue confirms the
        next fall, and a deep one is followed all the way.  So is a REMB under
        :data:`LINK_DROP_SHARE` of what we send: the receiver gets a fraction
        of it, the link dropped, and the round trips lag the queue by a report
        (LAN to 3G: an 80 ms queue seen while the link's was 400 ms; held at
        one back-off, the estimate stayed at 2.4 Mbit/s on a 450 kbit/s link
        for 1.5 s).
        """
        self.queue_delay.followed(now)
        depth = self.queue_delay.depth(now)
        bps, delivered = fall.bps, fall.delivered
        if depth is not None and depth < SMALL_QUEUE_DEPTH and delivered is not None:
            floor = int(REMB_STEP * delivered)
            if LINK_DROP_SHARE * delivered <= fall.measured < floor:
                bps += floor - fall.measured
                self.rembs_bounded += 1
        self.estimator.on_remb(bps, now)

    def _video_delivered_bps(self, now: float) -> int | None:
        """Video handed to the subscriber over the last ~second (None until measured)."""
        window = self._video_delivered
        if len(window) < 2 or window[-1][0] <= window[0][0]:
            return None
        return int(8 * sum(n for _, n in list(window)[1:]) / (window[-1][0] - window[0][0]))

    # -- the periodic decision ------------------------------------------------

    async def tick(
        self, slots: list[Slot], now: float | None = None, speaker: str | None = None
    ) -> None:
        """The periodic step: measure what was sent since the last one, then decide.

        ``speaker``: the room's active speaker (its camera goes first).
        """
        now = time.monotonic() if now is None else now
        self._account(slots, now)
        await self._decide(slots, now, speaker)

    async def react(self, slots: list[Slot], speaker: str | None = None) -> None:
        """The estimate fell: decide again now, on what the last periodic step measured.

        Not a measurement: rates taken over the few milliseconds since that
        step are noise (two copies of one audio packet read as 200 kbit/s and
        took the whole budget), and a video that sent nothing in them is not
        idle.
        """
        await self._decide(slots, time.monotonic(), speaker)

    def _account(self, slots: list[Slot], now: float) -> None:
        """What each DownTrack sent since the last periodic step."""
        delivered = video = 0
        active: set[int] = set()
        carrier = self.audio_mode.carrier if self.audio_mode is not None else None
        for slot in slots:
            key = id(slot.downtrack)
            total = slot.downtrack.wire_bytes_forwarded
            step = total - self._last_bytes.get(key, total)
            delivered += step
            self._last_bytes[key] = total
            if step > 0 and slot.kind == "video":
                active.add(key)
                video += step
            if step > 0:
                self._idle_since.pop(key, None)
            elif now - self._idle_since.setdefault(key, now) >= STALE_AFTER_IDLE_S:
                self._stale.add(key)
            if slot.info is not None and slot.forwarder is not None:
                self._measure(slot.forwarder, now)
            if slot is carrier and self._last_tick is not None and now > self._last_tick:
                bps = 8 * step / (now - self._last_tick)
                self._mix_bps = bps if self._mix_bps is None else 0.7 * self._mix_bps + 0.3 * bps
        self._last_tick = now
        window = self._video_delivered
        window.append((now, video))
        while len(window) > 2 and now - window[1][0] >= VIDEO_RATE_WINDOW_S:
            window.popleft()
        self._active_video = active
        if delivered > 0 and self._delivering_since is None:
            self._delivering_since = now
        self.estimator.on_delivered(delivered, now)
        self.estimator.rise_limit_bps = self._rise_limit(now, video > 0)

    async def _decide(self, slots: list[Slot], now: float, speaker: str | None) -> None:
        """Estimate -> audio first -> each video's layer, applied."""
        estimate = self.estimator.estimate_bps(now)
        if estimate < self._last_estimate * 0.9:
            logger.info(
                "%r: estimate %d -> %r", self, self._last_estimate, self.estimator.snapshot(now)
            )
        self._last_estimate = estimate
        if self.estimator.decreases != self._decreases_seen:
            self._decreases_seen = self.estimator.decreases
            self.step_memory.cut(now)
        videos: list[tuple[Slot, VideoCandidate]] = []
        originals: list[int] = []
        for slot in slots:
            if slot.info is None or slot.forwarder is None:
                continue
            if slot.info.kind == "audio":
                rate = self._original_bps.get(slot.forwarder.info.id)
                originals.append(AUDIO_BPS if rate is None else max(AUDIO_MIN_BPS, int(rate)))
                continue
            videos.append((slot, self._candidate(slot.forwarder, speaker)))
        audio_reserve = await self._audio(estimate, originals, slots)
        self._audio_reserve = audio_reserve
        mixing = self.audio_mode is not None and self.audio_mode.mixing
        rungs = [layer.bitrate for _, c in videos for layer in c.layers if layer.name != ORIGINAL]
        # the link's own round trip (the floor of the last seconds' samples), not one a
        # queue inflated: repeating into congestion would only add to it
        floor_rtt = self.queue_delay.recent_floor_s(now)
        copies = self.video_repeat.decide(
            self._loss,
            floor_rtt if floor_rtt is not None else self.estimator.snapshot(now).rtt_s,
            estimate - audio_reserve,
            min(rungs, default=None),
        )
        videos = [(slot, priced(c, copies)) for slot, c in videos]
        choices = self.allocator.allocate(
            estimate, [c for _, c in videos], audio_reserve, 1, cautious=mixing
        )
        for slot, candidate in videos:
            choice = choices.get(candidate.track_id)
            if choice is not None:
                await self._apply(slot, choice)
                self._repeat(slot, copies if choice.layer not in (ORIGINAL, PAUSED) else 1)
        self._remember_step(sum(c.bitrate for c in choices.values()), now)

    def _remember_step(self, spend: int, now: float) -> None:
        """Tell the step memory when the videos got dearer on a lossy long-RTT link
        (not a resume from all paused: the lowest rung is the probe there)."""
        previous, self._spend = self._spend, spend
        if not self.video_repeat.link_needs:
            self.step_memory.forget()
            return
        delivered = self.estimator.delivered_bps(now)
        if 0 < previous < spend and delivered is not None:
            self.step_memory.stepped_up(delivered, now)

    def _rise_limit(self, now: float, video_flowing: bool) -> float | None:
        """On a lossy long-RTT link, no rise past 1.5x what was delivered + 10 kbit/s.

        There a REMB is often stale (it is only evidence when it falls) and the
        loss rule lets the estimate climb 8 %/s: to 700 kbit/s on a 300 kbit/s
        satellite link, until a second video filled the 500 ms queue and a 62 %
        loss cut paused everything.  The limit is libwebrtc's clamp on its own
        REMB (1.5x what it receives): every rung step still fits.  After a step
        up that overfilled the link, no higher than a little above what it carried
        before the step, for a while (:mod:`stepmemory`).  Not while all video is
        paused: resuming the lowest rung is the probe.
        """
        if not (self.video_repeat.link_needs and video_flowing):
            return None
        delivered = self.estimator.delivered_bps(now)
        limit = self.step_memory.limit_bps(now)
        if delivered is None:
            return limit
        clamp = RISE_LIMIT_FACTOR * delivered + RISE_LIMIT_ADD_BPS
        return clamp if limit is None else min(limit, clamp)

    def _repeat(self, slot: Slot, copies: int) -> None:
        """Send every packet of ``slot`` ``copies`` times from now on."""
        key = id(slot.downtrack)
        if copies > 1:
            self._repeated.add(key)
        elif key not in self._repeated:
            return
        else:
            self._repeated.discard(key)
        sender = getattr(slot.transceiver, "sender", None)
        if sender is not None:
            hooks.repeat_packets(sender, copies, on_copy=slot.downtrack.count_repeat)

    async def _audio(self, estimate: int, originals: list[int], slots: list[Slot]) -> int:
        """Originals or one mix (audio first): returns what audio takes on the wire."""
        if self.audio_mode is None:
            return sum(originals)
        mode = self.audio_mode
        measured = int(self._mix_bps) if mode.mixing and self._mix_bps is not None else None
        plan = self.audio_rule.decide(
            estimate,
            originals,
            MIX_LAYERS,
            self._loss,
            measured,
            video_repeated=self.video_repeat.link_needs,
        )
        if not plan.mixing:
            self._mix_bps = None
        await mode.apply(plan, slots)
        return plan.reserve_bps

    def _measure(self, forwarder: Forwarder, now: float) -> None:
        """The published track's rate on the wire, smoothed over the periodic steps."""
        track_id = forwarder.info.id
        last = self._last_packet_bytes.get(track_id)
        self._last_packet_bytes[track_id] = (now, forwarder.wire_bytes)
        if last is not None and now > last[0]:
            rate = (forwarder.wire_bytes - last[1]) * 8 / (now - last[0])
            prev = self._original_bps.get(track_id)
            self._original_bps[track_id] = rate if prev is None else 0.7 * prev + 0.3 * rate

    def _candidate(self, forwarder: Forwarder, speaker: str | None = None) -> VideoCandidate:
        info = forwarder.info
        original = int(max(self._original_bps.get(info.id, 0.0), MIN_ORIGINAL_BPS))
        current = self.layers.get(info.id)  # the viewer's rung stays offered
        layers = [Layer(ORIGINAL, original)]
        layers += [
            Layer(r.name, wire_bps(r.bitrate, r.fps))
            for r in self.pool.rungs_for(forwarder, original, keep=current)
        ]
        if info.source == "screen":
            priority = PRIORITY_SCREEN
        elif info.participant_id == speaker and info.source == "camera":
            priority = PRIORITY_SPEAKER
        else:
            priority = PRIORITY_OTHER
        return VideoCandidate(info.id, priority, tuple(layers))

    async def _apply(self, slot: Slot, choice: Choice) -> None:
        assert slot.info is not None and slot.forwarder is not None
        track_id = slot.info.id
        forwarder = slot.forwarder
        previous = self.layers.get(track_id, ORIGINAL)
        if choice.layer == previous:
            return
        downtrack = slot.downtrack
        if previous == PAUSED:
            self._resumed_at[id(downtrack)] = time.monotonic()
        if choice.layer == PAUSED:
            downtrack.unbind()
        elif choice.layer == ORIGINAL:
            if previous == PAUSED:
                downtrack.bind(forwarder)
            else:
                downtrack.switch(forwarder)
        else:
            source = self.pool.acquire(forwarder, choice.layer)
            if previous == PAUSED:
                downtrack.bind(source)
            else:
                downtrack.switch(source)
        if previous not in (ORIGINAL, PAUSED):
            # make before break: the old rung keeps flowing until the switch happened
            asyncio.get_running_loop().call_later(
                RELEASE_DELAY_S, self.pool.release, forwarder, previous
            )
        self.layers[track_id] = choice.layer
        logger.info("%r: %s %s -> %s (%s)", self, track_id, previous, choice.layer, choice.reason)
        if self._on_layer is not None:
            await self._on_layer(slot.info, slot.mid, choice)

    def forget(
        self, track_id: str, forwarder: Forwarder | None, slots: list[Slot] | None = None
    ) -> None:
        """The subscriber no longer watches ``track_id`` (``slots``: all of its slots now)."""
        if self.audio_mode is not None and slots is not None:
            self.audio_mode.track_removed(slots)
        layer = self.layers.pop(track_id, ORIGINAL)
        self.allocator.forget(track_id)
        self._original_bps.pop(track_id, None)
        self._last_packet_bytes.pop(track_id, None)
        if forwarder is not None and layer not in (ORIGINAL, PAUSED):
            self.pool.release(forwarder, layer)

    def close(self, slots: list[Slot]) -> None:
        for slot in slots:
            if slot.info is not None:
                self.forget(slot.info.id, slot.forwarder)
        if self.audio_mode is not None:
            self.audio_mode.close()
