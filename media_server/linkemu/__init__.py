"""Link emulation for tests and benchmarks: put a participant on a bad link.

* :mod:`.profiles`: the named profiles (``lan``, ``lte``, ``3g``, ``satellite``, ``edge``).
* :mod:`.emulator`: userspace rate/queue/delay/jitter/loss emulator (the kernel
  here has no netem).
* :mod:`.attach`: route one aiortc RTCPeerConnection's UDP through an emulator.
* :mod:`.netns`: kernel rate limits (tbf) on a veth into a network namespace,
  for shaping a whole process or browser.
"""

from .attach import attach_to_peer_connection, attached_emulator, check_hooks
from .emulator import (
    DirectionStats,
    EmulatorStats,
    Fate,
    LinkDirection,
    LinkEmulator,
    LinkModel,
    LinkSchedule,
    Verdict,
    resolve_profile,
)
from .netns import (
    NetnsError,
    ShapedNamespace,
    apply_rate,
    available,
    cleanup_stale,
    clear_rate,
)
from .profiles import PROFILES, LinkProfile, get_profile

__all__ = [
    "PROFILES",
    "DirectionStats",
    "EmulatorStats",
    "Fate",
    "LinkDirection",
    "LinkEmulator",
    "LinkModel",
    "LinkProfile",
    "LinkSchedule",
    "NetnsError",
    "ShapedNamespace",
    "Verdict",
    "apply_rate",
    "attach_to_peer_connection",
    "attached_emulator",
    "available",
    "check_hooks",
    "cleanup_stale",
    "clear_rate",
    "get_profile",
    "resolve_profile",
]
