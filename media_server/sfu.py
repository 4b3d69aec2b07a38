"""Sfu: the media side of one process — its rooms and how media is relayed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum

from . import hooks
from .room import MediaRoom
from .rtc import rtc_configuration

logger = logging.getLogger(__name__)


class MediaMode(StrEnum):
    FORWARD = "forward"  # packets forwarded as received (the product)
    REENCODE = (
        "reencode"  # decode, then encode per subscriber (aiortc example; benchmark reference)
    )


class Sfu:
    def __init__(
        self,
        ice_urls: Iterable[str] = (),
        mode: MediaMode = MediaMode.FORWARD,
        *,
        adaptive: bool = True,
    ) -> None:
        self.mode = mode
        self.adaptive = adaptive  # per-viewer adaptation in every room (off: originals only)
        self.ice_urls = tuple(ice_urls)
        self.config = rtc_configuration(self.ice_urls)
        self.rooms: dict[str, MediaRoom] = {}
        if mode is MediaMode.FORWARD:
            hooks.prepare_process()
        else:
            hooks.uninstall_passthrough()
            hooks.enlarge_udp_buffers()
        self._closed = False

    def room(self, room_id: str) -> MediaRoom:
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = MediaRoom(room_id, self.config, adaptive=self.adaptive)
            logger.info("media room %s opened", room_id)
        return room

    async def release_if_empty(self, room_id: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None and room.empty:
            del self.rooms[room_id]
            await room.close()
            logger.info("media room %s closed", room_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        rooms, self.rooms = list(self.rooms.values()), {}
        for room in rooms:
            await room.close()
