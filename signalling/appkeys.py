"""Typed keys for everything the aiohttp application holds."""

from __future__ import annotations

from aiohttp import web

from signalling.auth import TokenAuthority
from signalling.settings import Settings

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
TOKENS: web.AppKey[TokenAuthority] = web.AppKey("tokens", TokenAuthority)

# the lead's keys: store, media, rooms
from media_server.sfu import Sfu  # noqa: E402
from signalling.rooms import RoomRegistry  # noqa: E402
from signalling.store import Store  # noqa: E402

STORE: web.AppKey[Store] = web.AppKey("store", Store)
SFU: web.AppKey[Sfu] = web.AppKey("sfu", Sfu)
ROOMS: web.AppKey[RoomRegistry] = web.AppKey("rooms", RoomRegistry)

# recording
from recording.registry import Recordings  # noqa: E402

RECORDINGS: web.AppKey[Recordings] = web.AppKey("recordings", Recordings)

# composite renders (background jobs)
from recording.render_jobs import RenderJobs  # noqa: E402

RENDER_JOBS: web.AppKey[RenderJobs] = web.AppKey("render_jobs", RenderJobs)
