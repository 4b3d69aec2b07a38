"""Reading a bounded JSON object from a REST request body."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .errors import BadRequest, KonsiliumError


class BodyTooLarge(KonsiliumError):
    code = "bad_request"
    status = 413


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any] | None:
    """The body as a JSON object, None when there is none; never reads past ``limit``."""
    if not request.can_read_body:
        return None
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
