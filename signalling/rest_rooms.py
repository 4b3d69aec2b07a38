"""REST view of rooms for an integrating system (admin API key)."""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from .appkeys import ROOMS, SETTINGS, SFU, STORE
from .errors import BadRequest, Forbidden, NotFound, Unauthorized
from .protocol import ROOM_ID_RE
from .rest_body import read_json_object
from .room_settings import RoomSettings, parse_room_settings, parse_title
from .store import RoomRecord

ADMIN_ACTOR = "admin-api"
MAX_BODY_BYTES = 4096


def require_admin(request: web.Request) -> None:
    key = request.app[SETTINGS].admin_api_key
    if not key:
        raise Forbidden(
            "the admin API is disabled: no admin API key is configured", code="disabled"
        )
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise Unauthorized("a valid admin API key is required")


async def list_rooms(request: web.Request) -> web.Response:
    require_admin(request)
    live = request.app[ROOMS].rooms
    rooms = await request.app[STORE].list_rooms()
    return web.json_response(
        {
            "rooms": [
                {
                    "id": r.id,
                    "title": r.title,
                    "created_at": r.created_at,
                    "live": r.id in live,
                    "participants": len(live[r.id].participants) if r.id in live else 0,
                }
                for r in rooms
            ]
        }
    )


async def get_room(request: web.Request) -> web.Response:
    require_admin(request)
    room_id = request.match_info["room"]
    if not ROOM_ID_RE.match(room_id):
        raise NotFound("no such room")
    record = await request.app[STORE].get_room(room_id)
    if record is None:
        raise NotFound("no such room")
    participants = await request.app[STORE].list_participants(room_id)
    return web.json_response(
        {
            **_room_json(record),
            "participants": [
                {
                    "id": p.participant_id,
                    "name": p.name,
                    "clinic": p.clinic,
                    "tier": p.tier,
                    "role": p.role,
                    "state": p.state,
                    "joined_at": p.joined_at,
                }
                for p in participants
            ],
        }
    )


async def put_room(request: web.Request) -> web.Response:
    """``PUT /api/rooms/{room}``: create or reconfigure a room (title and settings).

    Body: ``{"title": …, "settings": {consent_required, auto_record, retention_days,
    patient_ref, consultation_id}}``; the settings given replace the room's.
    """
    require_admin(request)
    room_id = request.match_info["room"]
    if not ROOM_ID_RE.match(room_id):
        raise BadRequest("a room id is 1..128 letters, digits, '.', '-' or '_'")
    body = await read_json_object(request, MAX_BODY_BYTES) or {}
    unknown = set(body) - {"title", "settings"}
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0][:64]!r}")
    settings = parse_room_settings(body.get("settings", {}))
    store = request.app[STORE]
    existing = await store.get_room(room_id)
    record = RoomRecord(
        id=room_id,
        title=parse_title(body.get("title"), existing.title if existing else room_id),
        created_at=existing.created_at if existing else time.time(),
        settings=settings.to_json(),
    )
    await store.put_room(record)
    await request.app[ROOMS].audit(
        ADMIN_ACTOR, "room_configure", room_id, "ok", settings=settings.to_json()
    )
    return web.json_response(_room_json(record), status=200 if existing else 201)


def _room_json(record: RoomRecord) -> dict[str, object]:
    return {
        "id": record.id,
        "title": record.title,
        "created_at": record.created_at,
        "settings": RoomSettings.from_record(record.settings).to_json(),
    }


async def room_media(request: web.Request) -> web.Response:
    """Live forwarding counters of a room on this node (for operators and benchmarks)."""
    require_admin(request)
    room = request.app[SFU].rooms.get(request.match_info["room"])
    if room is None:
        raise NotFound("the room has no live media on this node")
    return web.json_response(room.stats())


def add_room_routes(app: web.Application) -> None:
    app.router.add_get("/api/rooms", list_rooms)
    app.router.add_get("/api/rooms/{room}", get_room)
    app.router.add_put("/api/rooms/{room}", put_room)
    app.router.add_get("/api/rooms/{room}/media", room_media)
