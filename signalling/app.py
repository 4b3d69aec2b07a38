"""The aiohttp application factory: resources opened and closed in cleanup contexts."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from media_server.sfu import MediaMode, Sfu
from recording.registry import Recordings
from recording.render_jobs import RenderJobs
from recording.retention import RetentionSweeper

from .appkeys import RECORDINGS, RENDER_JOBS, ROOMS, SETTINGS, SFU, STORE, TOKENS
from .auth import TokenAuthority
from .errors import KonsiliumError, error_response, json_error
from .rest_recordings import add_recording_routes
from .rest_rooms import add_room_routes
from .rest_tokens import add_token_routes
from .rooms import RoomRegistry
from .session import websocket_handler
from .settings import Settings
from .store_factory import open_store

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024
RECORDING_WORKERS = 2  # muxing threads shared by every recorded track of this process

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error shape for the REST API; pages keep aiohttp's own."""
    try:
        return await handler(request)
    except KonsiliumError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        return json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)


async def _tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[TOKENS] = TokenAuthority.load_or_create(settings.data_dir, settings.token_key_file)
    yield


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = await open_store(app[SETTINGS].redis_url)
    app[STORE] = store
    yield
    await store.close()


async def _sfu_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sfu = Sfu(settings.ice_servers, MediaMode(settings.media_mode), adaptive=settings.adaptation)
    app[SFU] = sfu
    yield
    await sfu.close()


async def _recordings_ctx(app: web.Application) -> AsyncIterator[None]:
    executor = ThreadPoolExecutor(max_workers=RECORDING_WORKERS, thread_name_prefix="recording")
    try:
        settings = app[SETTINGS]
        app[RECORDINGS] = Recordings.open(
            settings.data_dir, key_file=settings.recording_key_file, executor=executor
        )
        yield
        await app[RECORDINGS].close()  # stops and seals what is still recording
    finally:
        await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)


async def _render_jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    jobs = RenderJobs()
    app[RENDER_JOBS] = jobs
    yield
    await jobs.close()  # cancels running renders, waits for the worker


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Delete expired recordings at start and then every hour (see recording.retention)."""
    settings = app[SETTINGS]
    sweeper = RetentionSweeper(
        settings.data_dir,
        app[STORE],
        retention_days=settings.retention_days,
        is_active=app[RECORDINGS].is_active,
        keyring=app[RECORDINGS].keyring,
    )
    sweeper.start()
    yield
    await sweeper.stop()


async def _rooms_ctx(app: web.Application) -> AsyncIterator[None]:
    node_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    registry = RoomRegistry(
        app[STORE],
        app[SFU],
        node_id,
        app[RECORDINGS],
        reconnect_grace_s=float(app[SETTINGS].reconnect_grace),
    )
    app[ROOMS] = registry
    yield
    await registry.close()


async def healthz(request: web.Request) -> web.Response:
    sfu = request.app[SFU]
    return web.json_response({"status": "ok", "rooms": len(sfu.rooms), "media_mode": str(sfu.mode)})


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[json_errors])
    app[SETTINGS] = settings
    app.cleanup_ctx.extend(
        [
            _tokens_ctx,
            _store_ctx,
            _sfu_ctx,
            _recordings_ctx,
            _render_jobs_ctx,
            _retention_ctx,
            _rooms_ctx,
        ]
    )
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    add_token_routes(app)
    add_room_routes(app)
    add_recording_routes(app)
    from web.pages import setup_web
    from web.playback import add_playback_routes

    setup_web(app)
    add_playback_routes(app)
    return app
