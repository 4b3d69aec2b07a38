"""The council room page in real Chromium (fake camera) against a real server and a bot.

What a participant would see: the other side's video decoded in their tile, their own
camera reaching the others through the SFU, names and clinics in their language,
mute and leave reaching the others, a clear error for a bad link.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.async_api import Browser, Page, WebSocketRoute

from media_server.bot import Bot
from media_server.clip import Clip
from signalling.auth import TokenAuthority
from tests.browser.conftest import OpenPage, PageLog
from tests.services import KonsiliumServer
from web.i18n import translations

pytestmark = pytest.mark.browser

ROOM = "room-1"
BOT_NAME = "Иванова А. П."
BOT_CLINIC = "ФАП Анадырь"
RU = translations("ru")
EN = translations("en")

T = TypeVar("T")


# -- helpers -------------------------------------------------------------------


def room_url(server: KonsiliumServer, token: str, lang: str | None = None) -> str:
    query = f"?lang={lang}" if lang else ""
    return f"{server.url}/r/{ROOM}{query}#t={token}"


async def start_bot(server: KonsiliumServer, clip: Clip, sub: str = "bot-ivanova") -> Bot:
    token = server.mint(sub, name=BOT_NAME, clinic=BOT_CLINIC, tier="district")
    bot = Bot(server.url, ROOM, token, clip=clip)
    await bot.start()
    return bot


def browser_token(server: KonsiliumServer, sub: str = "browser-petrov") -> str:
    return server.mint(sub, name="Петров С. И.", clinic="Окружная больница", tier="regional")


def why(log: PageLog, server: KonsiliumServer | None = None) -> str:
    """Page log (and the server's log tail) for an assertion message."""
    text = log.dump()
    if server is not None:
        text += f"\n--- server log tail ---\n{server.log_text()[-2500:]}"
    return text


async def until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float
) -> tuple[bool, T]:
    """Poll ``probe()`` every 200 ms until ``ok(value)``; return (ok, last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if ok(value):
            return True, value
        if time.monotonic() >= deadline:
            return False, value
        await asyncio.sleep(0.2)


async def page_state(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate(
        "() => window.konsilium ? window.konsilium.state() : {joined: false}"
    )
    return state


async def wait_joined(page: Page, log: PageLog, server: KonsiliumServer) -> str:
    """Wait for the page's ``joined``; return its participant id."""
    ok, state = await until(lambda: page_state(page), lambda s: bool(s.get("joined")), 10)
    assert ok, f"the page did not join: {state}{why(log, server)}"
    return str(state["selfId"])


async def video_from(page: Page, participant_id: str) -> dict[str, Any]:
    """The page's receive stats for one participant's camera ({} when none)."""
    stats: list[dict[str, Any]] = await page.evaluate("() => window.konsilium.videoStats()")
    return next((s for s in stats if s["participant_id"] == participant_id), {})


def tile(page: Page, participant_id: str) -> Any:
    return page.locator(f'#tiles figure.tile.remote[data-participant="{participant_id}"]')


async def text_of(page: Page, selector: str) -> str:
    """Text of the elements matching ``selector`` now ("" when none); never waits."""
    return " ".join(await page.locator(selector).all_text_contents()).strip()


# -- tests ---------------------------------------------------------------------


async def test_media_flows_both_ways_through_the_sfu(
    server: KonsiliumServer, clip: Clip, open_page: OpenPage, tmp_path: Path
) -> None:
    bot = await start_bot(server, clip)
    try:
        page, log = await open_page(room_url(server, browser_token(server)), locale="ru-RU")
        me = await wait_joined(page, log, server)

        # both directions flow within 15 s of joining
        deadline = time.monotonic() + 15

        async def page_decodes() -> tuple[bool, dict[str, Any]]:
            return await until(
                lambda: video_from(page, bot.id),
                lambda s: s.get("framesDecoded", 0) > 0,
                deadline - time.monotonic(),
            )

        async def bot_receives() -> bool:
            return await bot.wait_until(
                lambda: bot.stats.frames_from(me) > 0, deadline - time.monotonic()
            )

        (decoding, first), receiving = await asyncio.gather(page_decodes(), bot_receives())
        assert decoding, f"the page decoded no video of the bot: {first}{why(log, server)}"
        assert receiving, (
            f"the bot got no video from the page: {bot.stats.to_json()}{why(log, server)}"
        )

        # ... and keeps flowing: measure both over the same 2 s
        before = await video_from(page, bot.id)
        got_before = bot.stats.frames_from(me)
        await asyncio.sleep(2)
        after = await video_from(page, bot.id)
        got_after = bot.stats.frames_from(me)

        decoded = after["framesDecoded"] - before["framesDecoded"]
        assert decoded >= 15, (
            f"the page decoded {decoded} frames of the bot in 2 s: {before} -> {after}"
            f"{why(log, server)}"
        )
        assert (after["frameWidth"], after["frameHeight"]) == (640, 360), (
            f"the bot's video decodes as {after['frameWidth']}x{after['frameHeight']}{why(log)}"
        )
        received = got_after - got_before
        assert received >= 15, (
            f"the bot received {received} frames of the page's camera in 2 s"
            f" ({bot.stats.to_json()}){why(log, server)}"
        )

        # the bot's tile: its name, clinic and tier, in Russian
        bot_tile = tile(page, bot.id)
        assert await bot_tile.count() == 1, f"no tile for the bot{why(log)}"
        assert await text_of(page, f'[data-participant="{bot.id}"] .name') == BOT_NAME
        assert await text_of(page, f'[data-participant="{bot.id}"] .clinic') == BOT_CLINIC
        assert (
            await text_of(page, f'[data-participant="{bot.id}"] .badge.tier')
            == (RU["tier_district"])
        )
        assert await bot_tile.locator("video").evaluate("v => v.videoWidth") == 640

        # the page is in Russian for a Russian browser
        assert await page.get_attribute("html", "lang") == "ru"
        assert await text_of(page, "#btn-leave .ctl-label") == RU["leave"] == "Покинуть консилиум"
        assert await text_of(page, "#conn-text") == RU["state_connected"], why(log)
        assert await text_of(page, "#participant-count") == RU["participants_count"].format(n=2)

        shot = tmp_path / "room-ru.png"
        await page.screenshot(path=str(shot))
        assert shot.stat().st_size > 0
    finally:
        await bot.stop()


async def test_mute_and_leave_reach_the_others(
    server: KonsiliumServer, clip: Clip, open_page: OpenPage
) -> None:
    bot = await start_bot(server, clip)
    try:
        page, log = await open_page(room_url(server, browser_token(server)), locale="ru-RU")
        me = await wait_joined(page, log, server)
        assert await bot.wait_until(lambda: me in bot.others, 5), (
            f"the bot never saw the page join: {bot.others}{why(log, server)}"
        )
        assert bot.others[me]["muted"]["camera"] is False

        # the camera button is enabled once the fake camera is open
        await page.click("#btn-camera", timeout=10_000)
        muted = await bot.wait_until(
            lambda: bot.others.get(me, {}).get("muted", {}).get("camera") is True, 5
        )
        assert muted, f"the bot did not see the camera muted: {bot.others.get(me)}{why(log)}"
        assert bot.others[me]["muted"]["microphone"] is False
        label = await page.get_attribute("#btn-camera", "aria-label")
        assert label == RU["camera_unmute"], why(log)

        await page.click("#btn-leave")
        gone = await bot.wait_until(lambda: me in bot.left, 5)
        assert gone, f"the bot did not see the page leave: {bot.left}{why(log, server)}"
        assert bot.left[me] == "left"
        assert me not in bot.others
        assert await text_of(page, '#notices [data-key="left"] .text') == RU["you_left"]
    finally:
        await bot.stop()


async def test_tile_goes_when_the_bot_leaves_and_english_ui(
    server: KonsiliumServer, clip: Clip, open_page: OpenPage
) -> None:
    bot = await start_bot(server, clip)
    stopped = False
    try:
        # ?lang=en wins over a Russian browser
        page, log = await open_page(
            room_url(server, browser_token(server), lang="en"), locale="ru-RU"
        )
        await wait_joined(page, log, server)
        ok, count = await until(lambda: tile(page, bot.id).count(), lambda n: n == 1, 5)
        assert ok, f"no tile for the bot{why(log, server)}"
        assert await text_of(page, f'[data-participant="{bot.id}"] .name') == BOT_NAME
        assert (
            await text_of(page, f'[data-participant="{bot.id}"] .badge.tier')
            == (EN["tier_district"])
        )

        await bot.stop()
        stopped = True
        left_at = time.monotonic()
        ok, count = await until(lambda: tile(page, bot.id).count(), lambda n: n == 0, 5)
        waited = time.monotonic() - left_at
        assert ok, f"{count} tile(s) of the bot still there {waited:.1f}s after{why(log)}"
        state = await page_state(page)
        assert bot.id not in state["participants"], state
        assert not [t for t in state["tracks"] if t["participant_id"] == bot.id], state

        # English UI text
        assert await page.get_attribute("html", "lang") == "en"
        assert await text_of(page, "#btn-leave .ctl-label") == EN["leave"] == "Leave the council"
        assert await text_of(page, "#btn-camera .ctl-label") == EN["camera_mute"]
        notice = await text_of(page, f'#notices [data-key="p-{bot.id}"] .text')
        assert notice == EN["participant_left"].format(name=BOT_NAME), why(log)
        assert await text_of(page, "#participant-count") == "Participants: 1"
        assert await page.locator("#waiting").is_visible()
        assert await text_of(page, "#waiting") == EN["waiting_for_others"]
    finally:
        if not stopped:
            await bot.stop()


def _expired_token(server: KonsiliumServer) -> str:
    """A token signed with the server's own key whose ``exp`` passed an hour ago."""
    key_path = TokenAuthority.key_path(server.data_dir)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    now = int(time.time())
    claims = {
        "iss": "konsilium",
        "aud": "konsilium",
        "sub": "browser-late",
        "name": "Сидоров В. В.",
        "clinic": "ФАП Лаврентия",
        "tier": "district",
        "room": ROOM,
        "grants": ["join", "publish", "subscribe"],
        "iat": now - 7200,
        "exp": now - 3600,
    }
    return jwt.encode(claims, key, algorithm="EdDSA")  # type: ignore[arg-type]


def _foreign_token() -> str:
    """A well-formed token signed by a key the server does not know."""
    stranger = TokenAuthority(Ed25519PrivateKey.generate())
    return stranger.mint(
        sub="browser-forged",
        name="Посторонний",
        clinic="—",
        tier="federal",
        room=ROOM,
        grants=["join", "publish", "subscribe"],
        ttl_s=3600,
    )


async def test_bad_link_shows_translated_error_and_does_not_retry(
    server: KonsiliumServer, open_page: OpenPage
) -> None:
    assert TokenAuthority.key_path(server.data_dir).is_file(), "the server made no token key"
    cases = [
        ("expired", _expired_token(server), RU["error_token_expired"]),
        ("wrongly signed", _foreign_token(), RU["error_invalid_token"]),
    ]
    pages = [
        (name, expected, *(await open_page(room_url(server, token), locale="ru-RU")))
        for name, token, expected in cases
    ]

    async def fatal_text(page: Page) -> str:
        return await text_of(page, '#notices [data-key="fatal"] .text')

    for name, expected, page, log in pages:
        _, shown = await until(partial(fatal_text, page), lambda s: s != "", 10)
        assert shown == expected, f"{name} token: the page shows {shown!r}{why(log, server)}"

    await asyncio.sleep(5)  # reconnects start after 1 s: five seconds would show several
    for name, _expected, page, log in pages:
        assert log.websockets == 1, f"{name} token: {log.websockets} WebSockets{why(log)}"
        assert log.joins_sent == 1, f"{name} token: {log.joins_sent} joins{why(log)}"
        state = await page_state(page)
        assert state["joined"] is False and state["connection"] == "failed", state
        assert await text_of(page, "#conn-text") == RU["state_failed"]
        # a new link is needed: no "join again" button, no call controls
        assert not await page.locator("#btn-rejoin").is_visible()
        assert not await page.locator("#btn-leave").is_visible()
        assert not await page.locator("#tiles").is_visible()


# -- video quality and recording -------------------------------------------------


class WsTap:
    """The page's WebSockets pass through Playwright: everything is relayed unchanged,
    and a test can add a message for the page (``to_page``) or for the server as if the
    page had sent it (``to_server``)."""

    def __init__(self) -> None:
        self.routes: list[tuple[WebSocketRoute, WebSocketRoute]] = []

    def __call__(self, ws: WebSocketRoute) -> None:
        server_side = ws.connect_to_server()  # no handlers: both directions are forwarded
        self.routes.append((ws, server_side))

    def to_page(self, message: dict[str, Any]) -> None:
        self.routes[-1][0].send(json.dumps(message))

    def to_server(self, message: dict[str, Any]) -> None:
        self.routes[-1][1].send(json.dumps(message))


async def open_page_with_ws_tap(
    browser: Browser, url: str, tap: WsTap, *, locale: str = "ru-RU"
) -> tuple[Page, PageLog]:
    """Like ``open_page``, with the page's WebSockets through ``tap``; the caller closes
    ``page.context``."""
    context = await browser.new_context(
        locale=locale, viewport={"width": 1280, "height": 720}, permissions=["camera", "microphone"]
    )
    context.set_default_timeout(10_000)
    page = await context.new_page()
    log = PageLog(page)
    await page.route_web_socket(re.compile(r"/ws$"), tap)
    await page.goto(url, wait_until="domcontentloaded")
    return page, log


async def test_video_quality_badge_and_paused_video(
    server: KonsiliumServer, clip: Clip, browser: Browser, tmp_path: Path
) -> None:
    bot = await start_bot(server, clip)
    tap = WsTap()
    page, log = await open_page_with_ws_tap(browser, room_url(server, browser_token(server)), tap)
    try:
        await wait_joined(page, log, server)
        ok, stats = await until(
            lambda: video_from(page, bot.id), lambda s: s.get("framesDecoded", 0) > 0, 15
        )
        assert ok, f"the page decoded no video of the bot: {stats}{why(log, server)}"
        camera = next(
            t
            for t in (await page_state(page))["tracks"]
            if t["participant_id"] == bot.id and t["kind"] == "video"
        )
        root = f'#tiles .tile.remote[data-participant="{bot.id}"]'
        badge = page.locator(f"{root} .quality")
        note = page.locator(f"{root} .paused-note")
        assert not await badge.is_visible() and not await note.is_visible()

        async def server_says(layer: str, reason: str) -> None:
            tap.to_page(
                {"type": "video_quality", "track": camera, "layer": layer, "reason": reason}
            )

        async def quality() -> Any:
            return (await page_state(page))["quality"].get(bot.id)

        # a ladder rung: a badge with the rung and the reason
        await server_says("240p", "bandwidth")
        ok, layer = await until(quality, lambda q: q == "240p", 5)
        assert ok, f"state quality {layer!r}{why(log)}"
        assert await badge.is_visible()
        assert await badge.text_content() == RU["quality_reduced"].format(layer="240p")
        assert await badge.text_content() == "240p · слабый канал"
        assert not await note.is_visible()
        shot = tmp_path / "tile-quality.png"
        await page.locator(root).screenshot(path=str(shot))
        assert shot.stat().st_size > 0

        # paused: audio only; the last frame stays, dimmed, with the notice over it
        await server_says("paused", "bandwidth")
        ok, layer = await until(quality, lambda q: q == "paused", 5)
        assert ok, f"state quality {layer!r}{why(log)}"
        assert await note.is_visible()
        assert await note.text_content() == RU["video_paused"]
        assert not await badge.is_visible()
        video = page.locator(f"{root} video")
        assert await video.is_visible()
        assert await video.evaluate("v => v.videoWidth") == 640  # the frame is still there
        await page.locator(root).screenshot(path=str(tmp_path / "tile-paused.png"))

        # back to the original: nothing shown
        await server_says("original", "ok")
        ok, layer = await until(quality, lambda q: q == "original", 5)
        assert ok, f"state quality {layer!r}{why(log)}"
        assert not await badge.is_visible() and not await note.is_visible()
    finally:
        await page.context.close()
        await bot.stop()


async def test_recording_start_consent_and_stop(
    server: KonsiliumServer, clip: Clip, browser: Browser, open_page: OpenPage, tmp_path: Path
) -> None:
    bot = await start_bot(server, clip)
    page: Page | None = None
    try:
        recorder_token = server.mint(
            "browser-petrov",
            name="Петров С. И.",
            clinic="Окружная больница",
            grants=("join", "publish", "subscribe", "record"),
        )
        tap = WsTap()
        page, log = await open_page_with_ws_tap(browser, room_url(server, recorder_token), tap)
        other, other_log = await open_page(
            room_url(server, server.mint("browser-smirnova", name="Смирнова Е. А."), lang="en")
        )
        me = await wait_joined(page, log, server)
        them = await wait_joined(other, other_log, server)

        async def recording(p: Page) -> dict[str, Any]:
            state: dict[str, Any] = (await page_state(p))["recording"]
            return state

        # only the participant with the record grant gets the button
        start = page.locator("#btn-record")
        await start.wait_for(state="visible")
        assert await text_of(page, "#btn-record .ctl-label") == RU["recording_start"]
        assert not await other.locator("#btn-record").is_visible()
        assert not await page.locator("#rec").is_visible()

        await start.click()
        for p, lg in ((page, log), (other, other_log)):
            ok, rec = await until(partial(recording, p), lambda r: r["active"], 10)
            assert ok, f"no recording_started: {rec}{why(lg, server)}"
            assert rec["consent"] == "pending", rec
        assert await page.locator("#rec").is_visible()
        assert await text_of(page, "#rec") == "●Идёт запись"  # the dot and a CSS gap
        assert await text_of(other, "#rec-text") == EN["recording_on"]
        red = await page.locator("#rec").evaluate("e => getComputedStyle(e).backgroundColor")
        assert red == "rgb(197, 34, 31)", red
        assert await text_of(page, "#btn-record .ctl-label") == RU["recording_stop"]

        # the consent dialog is modal; its question has the focus; answered by keyboard
        dialog = page.locator("#consent-dialog")
        await dialog.wait_for(state="visible")
        assert await dialog.evaluate("d => d.open && d.matches(':modal')")
        await page.screenshot(path=str(tmp_path / "consent.png"))
        assert await page.evaluate("() => document.activeElement.id") == "consent-title"
        assert await text_of(page, "#btn-consent-yes") == RU["consent_agree"] == "Согласен(на)"
        assert await text_of(page, "#btn-consent-no") == RU["consent_decline"]
        await page.keyboard.press("Tab")
        assert await page.evaluate("() => document.activeElement.id") == "btn-consent-yes"
        await page.keyboard.press("Enter")
        ok, rec = await until(partial(recording, page), lambda r: r["consent"] == "granted", 5)
        assert ok, f"the server did not confirm the consent: {rec}{why(log, server)}"
        assert not await dialog.is_visible()
        assert await text_of(page, "#rec-consent-text") == RU["consent_state_granted"]
        await page.screenshot(path=str(tmp_path / "recording.png"))

        # the other participant declines: told it may leave, and the leave button is offered
        await other.locator("#consent-dialog").wait_for(state="visible")
        await other.click("#btn-consent-no")
        ok, rec = await until(partial(recording, other), lambda r: r["consent"] == "declined", 5)
        assert ok, f"the decline was not confirmed: {rec}{why(other_log, server)}"
        assert await other.locator("#consent-declined").is_visible()
        assert EN["consent_declined_default"] in await text_of(other, "#declined-text")
        assert await text_of(other, "#btn-declined-leave") == EN["leave"]
        await other.screenshot(path=str(tmp_path / "declined.png"))
        await other.click("#btn-declined-stay")
        assert not await other.locator("#consent-dialog").is_visible()
        assert await text_of(other, "#rec-consent-text") == EN["consent_state_declined"]
        assert (await recording(page))["active"] and them != me

        # stop: the indicator goes for everyone, with the reason
        await page.click("#btn-record")
        for p, lg in ((page, log), (other, other_log)):
            ok, rec = await until(partial(recording, p), lambda r: not r["active"], 10)
            assert ok, f"no recording_stopped: {rec}{why(lg, server)}"
            assert not await p.locator("#rec").is_visible()
        notice = '#notices [data-key="recording-stopped"] .text'
        assert await text_of(page, notice) == RU["recording_stopped_stopped"]
        assert await text_of(other, notice) == EN["recording_stopped_stopped"]
        assert await text_of(page, "#btn-record .ctl-label") == RU["recording_start"]

        # a stop when nothing is recorded (as if sent by the page): the server's error, translated
        tap.to_server({"type": "recording_stop"})
        error = '#notices [data-key="recording-error"] .text'
        ok, shown = await until(partial(text_of, page, error), lambda s: s != "", 5)
        assert shown == RU["error_not_recording"], why(log, server)
    finally:
        if page is not None:
            await page.context.close()
        await bot.stop()


async def test_a_dropped_participant_shows_as_reconnecting_not_gone(
    server: KonsiliumServer, clip: Clip, open_page: OpenPage
) -> None:
    bot = await start_bot(server, clip)
    try:
        page, log = await open_page(room_url(server, browser_token(server)), locale="ru-RU")
        await wait_joined(page, log, server)
        ok, _ = await until(lambda: tile(page, bot.id).count(), lambda n: n == 1, 5)
        assert ok, f"no tile for the bot{why(log, server)}"
        await bot.kill()  # the link drops without a goodbye
        selector = f'[data-participant="{bot.id}"].reconnecting'
        ok, _ = await until(lambda: page.locator(selector).count(), lambda n: n == 1, 6)
        assert ok, f"the tile was not shown as reconnecting{why(log, server)}"
        note = await page.get_attribute(f'[data-participant="{bot.id}"] .media', "data-note")
        assert note == "Переподключение…"
        assert await tile(page, bot.id).count() == 1  # still in the council
    finally:
        await bot.stop()
