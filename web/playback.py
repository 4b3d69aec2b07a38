"""Playback of a recording in the browser, for holders of the ``view_recordings`` grant.

Routes::

    GET  /recordings/{id}                      the player page (jinja2, ru / ?lang=en)
    POST /recordings/{id}/session              token (Authorization) -> HttpOnly cookie
    GET  /recordings/{id}/media/composite      the composite, decrypted, HTTP Range
    GET  /recordings/{id}/media/tracks/{track} one track's playback copy, decrypted, Range

Access is the same Ed25519 JWT as the room links, with the ``view_recordings``
grant, for the room the recording was made in.  A link is
``/recordings/<id>#t=<jwt>``: the fragment never reaches the server;
``playback.js`` sends the token once, in an Authorization header, to the session
endpoint, which answers with a cookie (HttpOnly, SameSite=Strict, path
``/recordings/<id>``, as long as the token) that the page and the ``<video>``
element's requests carry.  API clients may send ``Authorization: Bearer`` on
every request instead.  No token appears in a URL the server sees, in a log
line or in the audit log.

Audit: every page view, session and media request (each Range request) is
appended to the Store's audit log — actor the token's ``sub`` (``anonymous``
without a valid token), action ``recording_playback_view`` /
``recording_playback_session`` / ``recording_media``, the recording id, the
outcome (``ok`` or the refusal's code) and, for media, what and which bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from recording.errors import RecordingError
from recording.keyring import KeyUnavailable
from recording.playback import (
    COMPOSITE_NAME,
    PlaybackError,
    PlaybackView,
    build_track_copy,
    playback_view,
)
from recording.registry import UnknownRecording
from recording.segments import validate_track_id
from recording.storage import is_encrypted_recording, open_media, read_first_entry
from signalling.appkeys import RECORDINGS, ROOMS, TOKENS
from signalling.auth import AuthError, Claims, Grant
from web.pages import STATIC_DIR, page_context, render_page

log = logging.getLogger(__name__)

COOKIE = "konsilium_recording"
VIEW, SESSION, MEDIA = "recording_playback_view", "recording_playback_session", "recording_media"
READ_BLOCK = 1 << 20
ASSETS = ("room.css", "playback.css", "playback.js")
_AUTH_STATUS = {"token_expired": 401, "token_not_yet_valid": 401, "invalid_token": 401}


class Refused(Exception):
    """An access refused: HTTP status and a stable code (also the audit outcome)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code


def _asset_version(name: str) -> str:
    try:
        return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
    except OSError:
        return "0"


def clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() or None if header.startswith("Bearer ") else None


class _Playback:
    """Request handlers; holds the asset versions and the per-track build locks."""

    def __init__(self) -> None:
        self.assets = {name: _asset_version(name) for name in ASSETS}
        self._building: dict[tuple[str, str], asyncio.Lock] = {}

    # ------------------------------------------------------------ access

    async def _authorize(
        self, request: web.Request, action: str, token: str | None, **detail: object
    ) -> tuple[Claims, Path]:
        """The viewer's claims and the recording directory; Refused (audited) otherwise."""
        recording_id = request.match_info["id"]
        rooms = request.app[ROOMS]
        if token is None:
            await rooms.audit("anonymous", action, recording_id, "unauthorized", **detail)
            raise Refused(401, "unauthorized")
        try:
            claims = request.app[TOKENS].verify(token)
        except AuthError as exc:
            await rooms.audit("anonymous", action, recording_id, exc.code, **detail)
            raise Refused(_AUTH_STATUS.get(exc.code, 403), exc.code) from None
        if not claims.has(Grant.VIEW_RECORDINGS):
            await rooms.audit(claims.sub, action, recording_id, "forbidden", **detail)
            raise Refused(403, "forbidden")
        recordings = request.app[RECORDINGS]
        try:
            directory = recordings.directory(recording_id)
            first = await asyncio.to_thread(read_first_entry, directory, recordings.keyring)
        except UnknownRecording:
            await rooms.audit(claims.sub, action, recording_id, "not_found", **detail)
            raise Refused(404, "not_found") from None
        except KeyUnavailable:
            await rooms.audit(claims.sub, action, recording_id, "key_unavailable", **detail)
            raise Refused(503, "key_unavailable") from None
        except (OSError, RecordingError):
            await rooms.audit(claims.sub, action, recording_id, "unreadable", **detail)
            raise Refused(500, "unreadable") from None
        room = (first or {}).get("data", {}).get("room")
        if room != claims.room:
            await rooms.audit(claims.sub, action, recording_id, "wrong_room", **detail)
            raise Refused(403, "wrong_room")
        await rooms.audit(claims.sub, action, recording_id, "ok", **detail)
        return claims, directory

    # ------------------------------------------------------------ page

    def _context(self, request: web.Request, **extra: Any) -> dict[str, Any]:
        base = f"/recordings/{request.match_info['id']}"
        return page_context(request, self.assets, base=base, **extra)

    def _render(
        self, template: str, request: web.Request, context: dict[str, Any], status: int = 200
    ) -> web.Response:
        return render_page(template, request, context, status, no_store=True)

    async def page(self, request: web.Request) -> web.Response:
        token = _bearer(request) or request.cookies.get(COOKIE)
        if token is None:  # nothing served yet: the page that exchanges the link's token
            return self._render("recording_access.html", request, self._context(request))
        try:
            _claims, directory = await self._authorize(request, VIEW, token, item="page")
        except Refused as refused:
            return self._refused_page(request, refused)
        recordings = request.app[RECORDINGS]
        recording_id = directory.name
        try:
            entries = await asyncio.to_thread(recordings.entries, recording_id)
        except (OSError, RecordingError):
            return self._refused_page(request, Refused(500, "unreadable"))
        view = playback_view(recording_id, entries)
        context = self._context(request)
        context.update(
            view=view,
            active=recordings.is_active(recording_id),
            composite=(directory / COMPOSITE_NAME).is_file(),
            encrypted=await asyncio.to_thread(is_encrypted_recording, directory),
            timeline=_timeline(view, context["t"]),
            clock=clock,
        )
        return self._render("recording.html", request, context)

    def _refused_page(self, request: web.Request, refused: Refused) -> web.Response:
        context = self._context(request)
        t = context["t"]
        if refused.status == 401:
            return self._render("recording_access.html", request, context | {"denied": True}, 401)
        message = {
            404: t["playback_not_found"],
            503: t["playback_key_missing"],
            403: t["playback_forbidden"],
        }.get(refused.status, t["playback_not_found"])
        context.update(page_title=t["playback_title"], message=message)
        return self._render("base.html", request, context, refused.status)

    # ------------------------------------------------------------ session

    async def session(self, request: web.Request) -> web.Response:
        try:
            claims, directory = await self._authorize(request, SESSION, _bearer(request))
        except Refused as refused:
            return web.json_response(
                {"error": {"code": refused.code, "message": "access refused"}},
                status=refused.status,
            )
        response = web.Response(status=204)
        response.set_cookie(
            COOKIE,
            request.headers["Authorization"][7:].strip(),
            max_age=max(1, claims.exp - int(time.time())),
            path=f"/recordings/{directory.name}",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    # ------------------------------------------------------------ media

    async def composite(self, request: web.Request) -> web.StreamResponse:
        token = _bearer(request) or request.cookies.get(COOKIE)
        detail = {"item": "composite", "range": _range_text(request)}
        try:
            _claims, directory = await self._authorize(request, MEDIA, token, **detail)
        except Refused as refused:
            raise _http_error(refused) from None
        path = directory / COMPOSITE_NAME
        if not path.is_file():
            raise web.HTTPNotFound(text="no composite: render it first")
        return await self._send(request, path)

    async def track(self, request: web.Request) -> web.StreamResponse:
        token = _bearer(request) or request.cookies.get(COOKIE)
        track_id = request.match_info["track"]
        detail = {"item": f"track:{track_id[:128]}", "range": _range_text(request)}
        try:
            _claims, directory = await self._authorize(request, MEDIA, token, **detail)
            validate_track_id(track_id)
        except Refused as refused:
            raise _http_error(refused) from None
        except ValueError:
            raise web.HTTPNotFound(text="no such track") from None
        recordings = request.app[RECORDINGS]
        if recordings.is_active(directory.name):
            raise web.HTTPConflict(text="still recording")
        lock = self._building.setdefault((directory.name, track_id), asyncio.Lock())
        async with lock:
            try:
                path = await asyncio.to_thread(
                    build_track_copy, directory, track_id, recordings.keyring
                )
            except PlaybackError as exc:
                log.info("%s: track %s not playable: %s", directory.name, track_id, exc)
                raise web.HTTPNotFound(text="no such track") from None
        return await self._send(request, path)

    async def _send(self, request: web.Request, path: Path) -> web.StreamResponse:
        """The decrypted file, whole or the requested byte range, streamed in 1 MiB blocks."""
        keyring = request.app[RECORDINGS].keyring
        try:
            source = await asyncio.to_thread(open_media, path, keyring)
        except (OSError, RecordingError) as exc:
            log.error("%s: cannot be played: %s", path.name, exc)
            raise web.HTTPInternalServerError(text="the file cannot be read") from None
        try:
            size = source.seek(0, io.SEEK_END)
            start, stop = _byte_range(request, size)
            headers = {
                "Accept-Ranges": "bytes",
                "Content-Type": "video/webm",
                "Content-Length": str(stop - start),
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            }
            status = 200
            if request.headers.get("Range"):
                status = 206
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
            response = web.StreamResponse(status=status, headers=headers)
            await response.prepare(request)
            source.seek(start)
            position = start
            try:
                while position < stop:
                    block = await asyncio.to_thread(source.read, min(READ_BLOCK, stop - position))
                    if not block:
                        break
                    await response.write(block)
                    position += len(block)
                await response.write_eof()
            except ConnectionResetError:  # the player moved on (seek, pause): normal
                log.debug("%s: client went away at byte %d", path.name, position)
            except RecordingError as exc:  # altered since it was opened: cut the response
                log.error("%s: unreadable at byte %d: %s", path.name, position, exc)
                response.force_close()
            return response
        finally:
            source.close()


def _byte_range(request: web.Request, size: int) -> tuple[int, int]:
    """[start, stop) of the Range header (the whole file without one); 416 if unsatisfiable."""
    if not request.headers.get("Range"):
        return 0, size
    try:
        wanted = request.http_range
    except ValueError:
        raise _unsatisfiable(size) from None
    start, stop = wanted.start, wanted.stop
    if start is None:
        start = 0
    if start < 0:  # a suffix: the last -start bytes
        start, stop = max(0, size + start), size
    stop = size if stop is None else min(stop, size)
    if start >= stop:
        raise _unsatisfiable(size)
    return start, stop


def _unsatisfiable(size: int) -> web.HTTPRequestRangeNotSatisfiable:
    return web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})


def _range_text(request: web.Request) -> str:
    return request.headers.get("Range", "")[:64]


def _http_error(refused: Refused) -> web.HTTPException:
    cls: type[web.HTTPException] = {
        401: web.HTTPUnauthorized,
        403: web.HTTPForbidden,
        404: web.HTTPNotFound,
        503: web.HTTPServiceUnavailable,
    }.get(refused.status, web.HTTPInternalServerError)
    return cls(text=refused.code)


def _timeline(view: PlaybackView, t: dict[str, str]) -> list[dict[str, Any]]:
    """The timeline rows as the page shows them (labels in the page's language)."""
    rows = []
    for moment in view.timeline:
        detail = moment.detail
        if moment.kind in ("mute", "unmute"):
            detail = t.get(f"playback_src_{detail}", detail)
        rows.append(
            {
                "at": round(moment.offset_s, 3),
                "clock": clock(moment.offset_s),
                "kind": moment.kind,
                "label": t.get(f"playback_ev_{moment.kind}", moment.kind),
                "who": view.name_of(moment.participant_id) if moment.participant_id else "",
                "detail": detail,
            }
        )
    return rows


def add_playback_routes(app: web.Application) -> None:
    handlers = _Playback()
    app.router.add_get("/recordings/{id}", handlers.page, name="recording_playback")
    app.router.add_post("/recordings/{id}/session", handlers.session)
    app.router.add_get("/recordings/{id}/media/composite", handlers.composite)
    app.router.add_get("/recordings/{id}/media/tracks/{track}", handlers.track)
