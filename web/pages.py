"""Browser pages: the landing page and the council room (jinja2 + static JS).

The room page carries no secret: the access token lives in the URL fragment
(``/r/<room>#t=<jwt>``), which browsers never send to the server; room.js reads
it and sends it only inside the WebSocket ``join`` message.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from web.i18n import SUPPORTED_LANGUAGES, pick_language, translations

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"

ROOM_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# Media (camera, microphone, remote streams) comes from mediastream:/blob:;
# the WebSocket is same-origin ('self' covers ws:/wss: of the same host in CSP3,
# the explicit schemes keep older engines working).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

COMMON_HEADERS: Mapping[str, str] = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
}


def _asset_version(name: str) -> str:
    """Short content hash of a static file, for cache busting (``?v=``)."""
    try:
        return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
    except OSError:
        return "0"


def page_context(request: web.Request, assets: Any, **extra: Any) -> dict[str, Any]:
    """What every page's template gets: the language picked, its strings, the assets."""
    lang = pick_language(request.query.get("lang"), request.headers.get("Accept-Language"))
    context: dict[str, Any] = {
        "lang": lang,
        "languages": SUPPORTED_LANGUAGES,
        "t": translations(lang),
        "assets": assets,
    }
    context.update(extra)
    return context


def render_page(
    template: str,
    request: web.Request,
    context: dict[str, Any],
    status: int = 200,
    *,
    no_store: bool = False,
) -> web.Response:
    response: web.Response = aiohttp_jinja2.render_template(
        template, request, context, status=status
    )
    response.headers.update(COMMON_HEADERS)
    # The chosen language depends on Accept-Language.
    response.headers["Vary"] = "Accept-Language"
    if no_store:
        response.headers["Cache-Control"] = "no-store"
    return response


class _Pages:
    """Request handlers; holds the asset versions computed once at start-up."""

    def __init__(self) -> None:
        self.assets = {name: _asset_version(name) for name in ("room.css", "room.js")}

    def _context(self, request: web.Request, **extra: Any) -> dict[str, Any]:
        return page_context(request, self.assets, **extra)

    def _render(
        self, template: str, request: web.Request, context: dict[str, Any], status: int = 200
    ) -> web.Response:
        return render_page(template, request, context, status)

    async def index(self, request: web.Request) -> web.Response:
        return self._render("index.html", request, self._context(request))

    async def room(self, request: web.Request) -> web.Response:
        room = request.match_info["room"]
        if not ROOM_RE.fullmatch(room):
            return self.not_found(request)
        context = self._context(request, room=room)
        context["config"] = {"room": room, "lang": context["lang"], "ws_path": "/ws"}
        response = self._render("room.html", request, context)
        response.headers["Cache-Control"] = "no-store"
        return response

    def not_found(self, request: web.Request) -> web.Response:
        context = self._context(request)
        t = context["t"]
        context.update(page_title=t["not_found_title"], message=t["not_found_text"])
        response = self._render("base.html", request, context, status=404)
        response.headers["Cache-Control"] = "no-store"
        return response


def setup_web(app: web.Application) -> None:
    """Add the jinja2 environment, ``GET /``, ``GET /r/{room}`` and ``/static/``."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    pages = _Pages()
    app.router.add_get("/", pages.index, name="index")
    app.router.add_get("/r/{room}", pages.room, name="room")
    app.router.add_static("/static/", STATIC_DIR, name="static", append_version=False)
    log.debug("web pages set up (templates %s)", TEMPLATES_DIR)
