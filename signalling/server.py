"""`konsilium serve`: run the app, print where to go."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from .app import create_app
from .appkeys import TOKENS
from .auth import Grant, Tier, TokenAuthority
from .settings import Settings

logger = logging.getLogger(__name__)

DEMO_ROOM = "demo-konsilium"
DEMO_PEOPLE = (
    # (sub, name, clinic, tier, grants)
    (
        "chair-1",
        "Петров И. С.",
        "НМИЦ, Москва",
        Tier.FEDERAL,
        (Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE, Grant.CHAIR, Grant.RECORD),
    ),
    (
        "consultant-1",
        "Иванова А. П.",
        "ФАП Анадырь",
        Tier.DISTRICT,
        (Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE),
    ),
    (
        "consultant-2",
        "Сидоров К. В.",
        "Краевая больница, Петропавловск-Камчатский",
        Tier.REGIONAL,
        (Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE),
    ),
    (
        "observer-1",
        "Орлова Е. Н.",
        "Кузбасский центр",
        Tier.REGIONAL,
        (Grant.JOIN, Grant.SUBSCRIBE),
    ),
)


def demo_links(tokens: TokenAuthority, base_url: str, ttl_s: int) -> list[tuple[str, str]]:
    links = []
    for sub, name, clinic, tier, grants in DEMO_PEOPLE:
        token = tokens.mint(
            sub=sub,
            name=name,
            clinic=clinic,
            tier=tier,
            room=DEMO_ROOM,
            grants=frozenset(grants),
            ttl_s=ttl_s,
        )
        links.append((f"{sub} ({name})", f"{base_url}/r/{DEMO_ROOM}#t={token}"))
    return links


async def _run(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    base = settings.base_url
    print(f"Konsilium is running: open {base}/", flush=True)
    if settings.dev:
        print(f"Demo council '{DEMO_ROOM}' — open each link in its own browser window:", flush=True)
        for who, link in demo_links(app[TOKENS], base, settings.token_ttl):
            print(f"  {who}:\n    {link}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("Konsilium is stopping", flush=True)
        await runner.cleanup()


def serve(settings: Settings) -> int:
    if settings.recording_key_file is not None:
        from recording.keyring import EncryptionKeyError, Keyring

        try:  # a bad key file is an operator's mistake: say so before anything starts
            Keyring.load(settings.recording_key_file)
        except EncryptionKeyError as exc:
            print(f"konsilium: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiortc and aioice are chatty at INFO; their lines can carry SDP and addresses
    for noisy in ("aiortc", "aioice"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    asyncio.run(_run(settings))
    return 0
