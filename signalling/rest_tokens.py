"""REST: mint room tokens (``POST /api/tokens``) and publish the verifying key.

Minting needs ``Authorization: Bearer <admin_api_key>``; with no admin key
configured the endpoint is disabled (403). The public key at
``GET /api/keys/token`` lets other services verify tokens offline.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from aiohttp import web

from signalling.appkeys import SETTINGS, TOKENS
from signalling.auth import MAX_TEXT_CLAIM, ROOM_ID_RE, Grant, Tier
from signalling.errors import json_error
from signalling.settings import TOKEN_TTL_RANGE

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MAX_GRANTS = 16
_FIELDS = frozenset({"sub", "name", "clinic", "tier", "room", "grants", "ttl_s"})


class _BadField(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def mint_token(request: web.Request) -> web.Response:
    """``POST /api/tokens``: 201 ``{"token", "expires_at"}`` (expiry in Unix seconds)."""
    settings = request.app[SETTINGS]
    if not settings.admin_api_key:
        return json_error(403, "disabled", "token minting is disabled: no admin API key is set")
    if not _admin_key_ok(request.headers.get("Authorization", ""), settings.admin_api_key):
        return json_error(401, "unauthorized", "a valid admin API key is required")

    body = await _read_limited(request, MAX_BODY_BYTES)
    if body is None:
        return json_error(413, "bad_request", f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        fields = _parse_body(body, default_ttl=settings.token_ttl)
    except _BadField as exc:
        return json_error(400, "bad_request", exc.message)

    token, claims = request.app[TOKENS].issue(**fields)
    log.info(
        "minted token jti=%s sub=%r room=%r grants=%s exp=%d",
        claims.jti,
        claims.sub,
        claims.room,
        ",".join(sorted(claims.grants)),
        claims.exp,
    )
    return web.json_response(
        {"token": token, "expires_at": claims.exp},
        status=201,
        headers={"Cache-Control": "no-store"},
    )


async def public_key(request: web.Request) -> web.Response:
    """``GET /api/keys/token``: the Ed25519 public key (SubjectPublicKeyInfo PEM)."""
    return web.Response(text=request.app[TOKENS].public_key_pem(), content_type="text/plain")


def add_token_routes(app: web.Application) -> None:
    app.router.add_post("/api/tokens", mint_token)
    app.router.add_get("/api/keys/token", public_key)


def _admin_key_ok(header: str, admin_key: str) -> bool:
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    return hmac.compare_digest(presented.strip().encode(), admin_key.encode())


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None if it is longer than ``limit`` (checked while reading)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


def _parse_body(body: bytes, *, default_ttl: int) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BadField("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _BadField("the body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise _BadField(f"unknown field {unknown[0][:64]!r}")
    return {
        "sub": _text(data, "sub"),
        "name": _text(data, "name"),
        "clinic": _text(data, "clinic", allow_empty=True),
        "tier": _tier(data),
        "room": _room(data),
        "grants": _grants(data),
        "ttl_s": _ttl(data, default_ttl),
    }


def _text(data: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _BadField(f"field {key!r} must be a string")
    if not allow_empty and not value.strip():
        raise _BadField(f"field {key!r} must not be empty")
    if len(value) > MAX_TEXT_CLAIM:
        raise _BadField(f"field {key!r} is longer than {MAX_TEXT_CLAIM} characters")
    return value


def _tier(data: dict[str, Any]) -> Tier:
    value = data.get("tier")
    known = [t.value for t in Tier]
    if value not in known:
        raise _BadField(f"field 'tier' must be one of {', '.join(known)}")
    return Tier(value)


def _room(data: dict[str, Any]) -> str:
    value = data.get("room")
    if not isinstance(value, str) or not ROOM_ID_RE.fullmatch(value):
        raise _BadField("field 'room' must be 1-128 characters of A-Z a-z 0-9 _ . -")
    return value


def _grants(data: dict[str, Any]) -> list[Grant]:
    value = data.get("grants")
    known = [g.value for g in Grant]
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_GRANTS
        or not all(isinstance(g, str) for g in value)
    ):
        raise _BadField(f"field 'grants' must be a list of 1-{MAX_GRANTS} strings")
    for g in value:
        if g not in known:
            raise _BadField(f"field 'grants': unknown grant {g[:64]!r} (known: {', '.join(known)})")
    return [Grant(g) for g in value]


def _ttl(data: dict[str, Any], default: int) -> int:
    if "ttl_s" not in data:
        return default
    value = data["ttl_s"]
    low, high = TOKEN_TTL_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadField(f"field 'ttl_s' must be an integer between {low} and {high}")
    return value
