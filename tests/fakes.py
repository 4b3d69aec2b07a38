"""Test doubles for project-internal seams (never for real components)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from media_server.packet import MediaPacket


class FakeSource:
    """A packet source (stands in for a Forwarder or ladder rung) driven by the test."""

    def __init__(self, name: str = "src") -> None:
        self.name = name
        self.sinks: list[Any] = []
        self.keyframe_requests = 0

    def attach(self, sink: Any) -> None:
        if sink not in self.sinks:
            self.sinks.append(sink)

    def detach(self, sink: Any) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)

    def request_keyframe(self) -> None:
        self.keyframe_requests += 1

    def emit(self, pts: int, *, keyframe: bool = False, data: bytes | None = None) -> MediaPacket:
        packet = MediaPacket(
            data=data or f"{self.name}:{pts}".encode(),
            pts=pts,
            time_base=Fraction(1, 90000),
            keyframe=keyframe,
            kind="video",
        )
        for sink in list(self.sinks):
            sink.push(packet)
        return packet
