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

REASON_OK = "ok"  # the best layer this video has
REASON_BANDWIDTH = "bandwidth"  # lower than the best layer, or paused, for lack of bandwidth

PRIORITY_SCREEN = 3
PRIORITY_SPEAKER = 2
PRIORITY_OTHER = 0


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

    def allocate(
        self,
        estimate_bps: float,
        videos: Sequence[VideoCandidate],
        audio_bps: int,
        audio_tracks: int = 1,
    ) -> dict[str, Choice]:
        """Choose a layer for every video; ``audio_bps`` is per audio track."""
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
        up = _best_within(layers, remaining / cfg.upgrade_margin)
        if _rank(layers, up) > _rank(layers, current):
            state.streak += 1
            if state.streak >= cfg.upgrade_calls * state.backoff:
                state.layer, state.streak, state.upgraded_at = _name(up), 0, self._calls
                return _choice(up, layers)
        else:
            state.streak = 0
        return _choice(current, layers)


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
