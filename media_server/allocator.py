"""Allocator: one subscriber's estimate shared out across the videos it watches.

Pure and deterministic: no I/O, no clock.  It keeps only what hysteresis needs
(the layer each video got last time and how many calls in a row it could have
had a better one), so the same sequence of calls always gives the same answers.
One Allocator per subscriber; call :meth:`Allocator.allocate` whenever the
estimate, the set of videos or their priorities change (and about once a
second anyway: the upgrade hysteresis counts calls).

Rule
----
1. **Budget** = ``estimate x headroom`` (default 1.0: the estimate is already
   conservative, a receiver's REMB backs off to 0.85x of what it measured on
   overuse, and the loss rule cuts below the delivered rate).
2. **Audio first**: ``audio_bps x audio_tracks`` is reserved before any video;
   audio is never paused, so the reservation is taken even if it leaves
   nothing (or less than nothing) for video.
3. **Videos by priority** (higher first; equal priorities keep the caller's
   order): each gets the best layer (``"original"`` or a rung) that fits what
   is left, then the next video is served from the remainder.  A video for
   which no layer fits is ``"paused"`` with reason ``"bandwidth"``.
4. **Hysteresis** (a dead band *below* each layer, and a call count above it):
   * *down at once* — a video whose current layer exceeds what is left by more
     than the dead band (``bitrate x downgrade_margin > left``, margin 0.9)
     drops in the same call to the best layer that fits (or pauses);
   * *up after a streak* — a better layer (or resuming from pause) is taken
     only after ``upgrade_calls`` (3) consecutive calls in which it fits
     (``bitrate x upgrade_margin <= left``, margin 1.0); the best layer that
     fits at that moment is taken;
   * *back-off* — an upgrade undone within ``probe_calls`` (5) calls was a
     failed probe: the next upgrade of that video needs twice as many calls
     (up to ``max_backoff`` x); an upgrade that holds resets it;
   * a video seen for the first time, or whose priority went up (it became
     the active speaker or a screen share), is placed at once: there is nothing
     to flap from, and a new speaker must not wait.  The others make room in
     the same call, since down is always immediate.

Audio mode (:class:`AudioRule`)
-------------------------------
Every Opus original costs ~56 kbit/s on the wire, ~40 of them headers: five
take a satellite link whole and four EDGE links.  One rule per subscriber,
called before :meth:`Allocator.allocate`, decides whether it gets the audio
originals or one *mix* of them (``media_server.audiomix``) and its reserve:

* **into the mix, at once**, when more than one audio track is watched and
  the originals take more than ``enter_share`` (40 %) of the estimate;
* **back to the originals** only once they take at most ``leave_share``
  (25 %) of it for ``leave_calls`` (6) calls in a row; leaving again soon after
  a return (within ``probe_calls``) doubles the streak needed next time;
* **the mix's format**: the best whose wire rate fits ``mix_share`` (30 %) of
  the estimate, the cheapest one when none does (audio is never paused); down
  at once once the current one exceeds that share by 15 %, up after
  ``upgrade_calls`` (10) calls in a row (each change restarts the encoder).
  On a lossy link (smoothed loss >= 1 %, until < 0.4 %) each packet is sent
  twice if the doubled rate fits ``repeat_share`` (50 %) of the estimate: two
  copies of a cheaper format are preferred to one of a better format.  When
  the video is sent twice as well (``video_repeated``, a long round trip:
  :mod:`media_server.repeat`) the two copies get ``repeat_share_with_video``
  (35 %) when two copies of some format still fit that: a wideband
  16 kbit/s voice leaves room for a picture that does not freeze, 24 kbit/s
  would not, and audio's own second copy comes before the picture's;
* **the reserve** taken before any video: the originals' measured rates, or
  the mix's nominal wire rate (all copies) or its measured rate if higher.

Why the dead band sits below the layer, not above it: aiortc cannot probe, and
a receiver's REMB never exceeds 1.5x what it receives (+10 kbit/s).  Rungs
about 1.45x apart are reachable from the one below only if an upgrade needs
no extra margin on top; a 15 % margin above the next layer would make most
steps unreachable on a clean link.  The 10 % band below still absorbs REMB
noise, while real congestion (REMB drops to 0.85x the measured rate, loss
> 10 % cuts harder) always crosses it.  The call streak, the estimator's own
8 %/s limit and the back-off after failed probes keep choices from flapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ORIGINAL = "original"
PAUSED = "paused"

AUDIO_ORIGINALS = "originals"
AUDIO_MIX = "mix"

REASON_OK = "ok"  # the best layer this video has
REASON_BANDWIDTH = "bandwidth"  # lower than the best layer, or paused, for lack of bandwidth

PRIORITY_SCREEN = 3
PRIORITY_SPEAKER = 2
PRIORITY_OTHER = 0

CAUTIOUS_MARGIN = 1.15  # headroom an upgrade needs on a link whose audio is mixed


@dataclass(frozen=True, slots=True)
class Layer:
    """One way to send a video: ``"original"`` or a ladder rung, and its bitrate."""

    name: str
    bitrate: int


@dataclass(frozen=True, slots=True)
class VideoCandidate:
    """A published video the subscriber watches, with the layers it can get."""

    track_id: str
    priority: int  # higher is served first: screen share / active speaker > others
    layers: tuple[Layer, ...]  # any order; usually the original and the ladder's rungs


@dataclass(frozen=True, slots=True)
class Choice:
    layer: str  # "original" | a rung name | "paused"
    reason: str  # "ok" | "bandwidth"
    bitrate: int = 0  # the chosen layer's bitrate (0 when paused)

    @property
    def paused(self) -> bool:
        return self.layer == PAUSED


@dataclass(frozen=True, slots=True)
class AllocatorConfig:
    headroom: float = 1.0
    upgrade_margin: float = 1.0
    downgrade_margin: float = 0.9
    upgrade_calls: int = 3
    probe_calls: int = 5
    max_backoff: int = 8
    # the most important video keeps (or gets) its lowest layer while the budget
    # covers this share of it: on a weak link a small picture beats a paused one,
    # and the estimate's loss cuts overshoot by about this much
    lowest_layer_fraction: float = 0.75

    def __post_init__(self) -> None:
        if not 0 < self.headroom <= 1:
            raise ValueError("headroom must be in (0, 1]")
        if not 0 < self.downgrade_margin <= 1 <= self.upgrade_margin:
            raise ValueError("need 0 < downgrade_margin <= 1 <= upgrade_margin")
        if self.upgrade_calls < 1 or self.probe_calls < 0 or self.max_backoff < 1:
            raise ValueError("upgrade_calls and max_backoff must be >= 1, probe_calls >= 0")


@dataclass(slots=True)
class _TrackState:
    layer: str
    priority: int
    streak: int = 0  # consecutive calls in which a better layer fitted
    backoff: int = 1  # multiplies upgrade_calls after failed probes
    upgraded_at: int | None = None  # call number of the last upgrade


class Allocator:
    """Per-subscriber layer choice with audio first, priorities and hysteresis."""

    def __init__(self, config: AllocatorConfig | None = None) -> None:
        self.config = config or AllocatorConfig()
        self._state: dict[str, _TrackState] = {}
        self._calls = 0
        self._cautious = False

    def allocate(
        self,
        estimate_bps: float,
        videos: Sequence[VideoCandidate],
        audio_bps: int,
        audio_tracks: int = 1,
        *,
        cautious: bool = False,
    ) -> dict[str, Choice]:
        """Choose a layer for every video; ``audio_bps`` is per audio track.

        ``cautious``: the link is so small that audio needed a mix.  An upgrade
        is a probe that fills the one queue audio shares with video, so it needs
        :data:`CAUTIOUS_MARGIN` of headroom and twice the streak.
        """
        self._cautious = cautious
        ids = [video.track_id for video in videos]
        if len(set(ids)) != len(ids):
            raise ValueError("a track is listed twice")
        self._calls += 1
        reserve = max(0, audio_bps) * max(0, audio_tracks)
        remaining = max(0.0, estimate_bps) * self.config.headroom - reserve
        ordered = sorted(enumerate(videos), key=lambda item: (-item[1].priority, item[0]))
        choices: dict[str, Choice] = {}
        first = True
        for _, video in ordered:
            choice = self._choose(video, remaining, first)
            choices[video.track_id] = choice
            remaining -= choice.bitrate
            first = False
        for gone in set(self._state) - set(ids):
            del self._state[gone]
        return {track_id: choices[track_id] for track_id in ids}

    def forget(self, track_id: str) -> None:
        """Drop the hysteresis state of a video (it is placed afresh next time)."""
        self._state.pop(track_id, None)

    def current(self, track_id: str) -> str | None:
        """The layer given to ``track_id`` by the last call, if any."""
        state = self._state.get(track_id)
        return None if state is None else state.layer

    def _choose(self, video: VideoCandidate, remaining: float, first: bool) -> Choice:
        cfg = self.config
        layers = sorted(video.layers, key=lambda layer: (layer.bitrate, layer.name))
        fits = _best_within(layers, remaining)
        if (
            first
            and fits is None
            and layers
            and layers[0].bitrate * cfg.lowest_layer_fraction <= remaining
        ):
            fits = layers[0]  # the most important video is not paused for a small shortfall
        state = self._state.get(video.track_id)
        current = None if state is None else _find(layers, state.layer)
        if (
            state is None
            or video.priority > state.priority
            or (state.layer != PAUSED and current is None)
        ):
            # first sight, promoted, or its layer vanished: placed at once
            self._state[video.track_id] = _TrackState(_name(fits), video.priority)
            return _choice(fits, layers)
        state.priority = video.priority
        if current is not None and current.bitrate * cfg.downgrade_margin > remaining:
            # down, at once; an upgrade undone this soon was a failed probe
            if state.upgraded_at is not None:
                if self._calls - state.upgraded_at <= cfg.probe_calls:
                    state.backoff = min(cfg.max_backoff, state.backoff * 2)
            state.layer, state.streak, state.upgraded_at = _name(fits), 0, None
            return _choice(fits, layers)
        if state.upgraded_at is not None and self._calls - state.upgraded_at > cfg.probe_calls:
            state.upgraded_at, state.backoff = None, 1  # the last upgrade held
        margin = cfg.upgrade_margin * (CAUTIOUS_MARGIN if self._cautious else 1.0)
        up = _best_within(layers, remaining / margin)
        if _rank(layers, up) > _rank(layers, current):
            state.streak += 1
            calls = cfg.upgrade_calls * state.backoff * (2 if self._cautious else 1)
            if state.streak >= calls:
                state.layer, state.streak, state.upgraded_at = _name(up), 0, self._calls
                return _choice(up, layers)
        else:
            state.streak = 0
        return _choice(current, layers)


def _cost(option: tuple[Layer, int]) -> int:
    layer, copies = option
    return layer.bitrate * copies


def _best_within(layers: Sequence[Layer], budget: float) -> Layer | None:
    best = None
    for layer in layers:  # ascending bitrate
        if layer.bitrate <= budget:
            best = layer
    return best


def _find(layers: Sequence[Layer], name: str) -> Layer | None:
    for layer in layers:
        if layer.name == name:
            return layer
    return None


def _rank(layers: Sequence[Layer], layer: Layer | None) -> int:
    return -1 if layer is None else layers.index(layer)


def _name(layer: Layer | None) -> str:
    return PAUSED if layer is None else layer.name


def _choice(layer: Layer | None, layers: Sequence[Layer]) -> Choice:
    if layer is None:
        return Choice(PAUSED, REASON_BANDWIDTH, 0)
    reason = REASON_OK if layer is layers[-1] else REASON_BANDWIDTH
    return Choice(layer.name, reason, layer.bitrate)


@dataclass(frozen=True, slots=True)
class AudioPlan:
    """What a subscriber's audio carries: the originals, or one mix in a format."""

    mode: str  # AUDIO_ORIGINALS | AUDIO_MIX
    reserve_bps: int  # taken on the wire before any video
    layer: Layer | None = None  # the mix's format (one copy's wire rate) when mixing
    copies: int = 1

    @property
    def mixing(self) -> bool:
        return self.mode == AUDIO_MIX


@dataclass(frozen=True, slots=True)
class AudioRuleConfig:
    enter_share: float = 0.4
    leave_share: float = 0.25
    leave_calls: int = 6
    probe_calls: int = 20
    max_backoff: int = 8
    mix_share: float = 0.3
    format_dead_band: float = 0.85  # the current format is kept while it costs <= cap / this
    upgrade_calls: int = 10
    repeat_share: float = 0.5  # two copies of the mix may take this share of the estimate
    repeat_share_with_video: float = 0.35  # ... while video packets are repeated too
    repeat_above_loss: float = 0.01
    repeat_below_loss: float = 0.004

    def __post_init__(self) -> None:
        if not 0 < self.leave_share < self.enter_share:
            raise ValueError("need 0 < leave_share < enter_share")
        if self.leave_calls < 1 or self.upgrade_calls < 1 or self.max_backoff < 1:
            raise ValueError("leave_calls, upgrade_calls and max_backoff must be >= 1")
        if not 0 <= self.repeat_below_loss <= self.repeat_above_loss:
            raise ValueError("need 0 <= repeat_below_loss <= repeat_above_loss")


class AudioRule:
    """Per-subscriber choice between the audio originals and a mix, with hysteresis."""

    def __init__(self, config: AudioRuleConfig | None = None) -> None:
        self.config = config or AudioRuleConfig()
        self._calls = 0
        self._mixing = False
        self._streak = 0  # calls in a row in which the originals fitted comfortably
        self._backoff = 1
        self._left_at: int | None = None  # call that went back to the originals
        self._option: tuple[str, int] | None = None  # (format name, copies)
        self._up_streak = 0
        self._lossy = False

    @property
    def mixing(self) -> bool:
        return self._mixing

    def decide(
        self,
        estimate_bps: float,
        originals_bps: Sequence[int],
        mix_layers: Sequence[Layer],
        loss: float | None = None,
        measured_mix_bps: int | None = None,
        video_repeated: bool = False,
    ) -> AudioPlan:
        """``originals_bps``: each watched audio original's wire rate; ``mix_layers``: the
        mix formats with one copy's wire rate; ``loss``: smoothed loss (0..1), if known."""
        cfg = self.config
        self._calls += 1
        total = sum(max(0, b) for b in originals_bps)
        budget = max(0.0, float(estimate_bps))
        if self._lossy:
            self._lossy = loss is None or loss >= cfg.repeat_below_loss
        else:
            self._lossy = loss is not None and loss >= cfg.repeat_above_loss
        if len(originals_bps) < 2 or not mix_layers:
            self._to_originals()
            return AudioPlan(AUDIO_ORIGINALS, total)
        if not self._mixing:
            if (
                self._left_at is not None
                and self._calls - self._left_at > cfg.probe_calls
                and self._backoff > 1
            ):
                self._backoff = 1  # the last return to the originals held
            if total <= cfg.enter_share * budget:
                return AudioPlan(AUDIO_ORIGINALS, total)
            if self._left_at is not None and self._calls - self._left_at <= cfg.probe_calls:
                self._backoff = min(cfg.max_backoff, self._backoff * 2)
            self._mixing, self._streak, self._option = True, 0, None
        elif total <= cfg.leave_share * budget:
            self._streak += 1
            if self._streak >= cfg.leave_calls * self._backoff:
                self._to_originals()
                self._left_at = self._calls
                return AudioPlan(AUDIO_ORIGINALS, total)
        else:
            self._streak = 0
        layer, copies = self._choose_format(budget, mix_layers, video_repeated)
        reserve = max(layer.bitrate * copies, measured_mix_bps or 0)
        return AudioPlan(AUDIO_MIX, reserve, layer, copies)

    def _to_originals(self) -> None:
        self._mixing, self._streak, self._option, self._up_streak = False, 0, None, 0

    def _choose_format(
        self, budget: float, layers: Sequence[Layer], video_repeated: bool = False
    ) -> tuple[Layer, int]:
        cfg = self.config
        best_first = sorted(layers, key=lambda layer: (-layer.bitrate, layer.name))
        options = [(layer, 2) for layer in best_first] if self._lossy else []
        options += [(layer, 1) for layer in best_first]

        def cap(copies: int, repeat_share: float) -> float:
            return (repeat_share if copies > 1 else cfg.mix_share) * budget

        def best(repeat_share: float) -> int:
            return next(
                (
                    i
                    for i, (layer, n) in enumerate(options)
                    if layer.bitrate * n <= cap(n, repeat_share)
                ),
                len(options) - 1,  # the cheapest single copy: audio is never paused
            )

        repeat_share = cfg.repeat_share
        fits = best(repeat_share)
        if video_repeated:  # leaner, but never at the cost of audio's own second copy
            lean = best(cfg.repeat_share_with_video)
            if options[lean][1] > 1:
                repeat_share, fits = cfg.repeat_share_with_video, lean

        keys = [(layer.name, n) for layer, n in options]
        current = keys.index(self._option) if self._option in keys else None
        kept = current is not None and (
            _cost(options[current]) * cfg.format_dead_band <= cap(options[current][1], repeat_share)
        )
        if current is None or (current != fits and not kept):
            chosen = fits  # first choice, or the current one no longer fits: at once
            self._up_streak = 0
        elif fits < current:
            self._up_streak += 1
            chosen = current
            if self._up_streak >= cfg.upgrade_calls:
                chosen, self._up_streak = fits, 0
        else:
            chosen, self._up_streak = current, 0
        self._option = keys[chosen]
        return options[chosen]
