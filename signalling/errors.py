"""Typed errors inside, one JSON shape outside.

REST: ``{"error": {"code": ..., "message": ...}}`` with an HTTP status.
WebSocket: ``{"type": "error", "code": ..., "message": ..., "ref": ...}``.
"""

from __future__ import annotations

from aiohttp import web


class KonsiliumError(Exception):
    """Base for errors that reach a client. ``code`` is stable, ``message`` is for people."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequest(KonsiliumError):
    code = "bad_request"
    status = 400


class Unauthorized(KonsiliumError):
    code = "unauthorized"
    status = 401


class Forbidden(KonsiliumError):
    code = "forbidden"
    status = 403


class NotFound(KonsiliumError):
    code = "not_found"
    status = 404


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def error_response(exc: KonsiliumError) -> web.Response:
    return json_error(exc.status, exc.code, exc.message)
