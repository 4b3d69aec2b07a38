"""Browser fixtures: Debian's Chromium driven by Python Playwright, with a fake camera.

Nothing is downloaded: Playwright drives ``/usr/bin/chromium`` (installed by
``scripts/install-system``), never a browser of its own (no ``playwright install``).
A missing Chromium is a failure, not a skip, so CI cannot silently test nothing.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright

CHROMIUM = Path("/usr/bin/chromium")

CHROMIUM_ARGS = (
    "--no-sandbox",  # the tests run as root
    "--use-fake-ui-for-media-stream",  # grant camera and microphone without a prompt
    "--use-fake-device-for-media-stream",  # a synthetic camera and microphone
    "--autoplay-policy=no-user-gesture-required",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)


class PageLog:
    """What a page said: console messages, uncaught errors, WebSockets and their frames."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self._started = time.monotonic()
        self.lines: list[str] = []
        self.websockets = 0
        self.joins_sent = 0
        page.on("console", self._on_console)
        page.on("pageerror", lambda err: self._add(f"pageerror: {err}"))
        page.on("crash", lambda _page: self._add("page crashed"))
        page.on("websocket", self._on_websocket)

    def _add(self, line: str) -> None:
        self.lines.append(f"{time.monotonic() - self._started:6.2f}s {line}")

    def _on_console(self, msg: ConsoleMessage) -> None:
        self._add(f"console.{msg.type}: {msg.text}")

    def _on_websocket(self, ws: Any) -> None:
        self.websockets += 1
        self._add(f"websocket opened: {ws.url}")
        ws.on("framesent", self._on_frame_sent)
        ws.on("close", lambda _ws: self._add("websocket closed"))

    def _on_frame_sent(self, payload: str | bytes) -> None:
        # never log the frame itself: a join carries the access token
        if isinstance(payload, str) and '"type":"join"' in payload.replace(" ", ""):
            self.joins_sent += 1
            self._add("websocket: join sent")

    def dump(self) -> str:
        """The page's log, for an assertion message."""
        body = "\n".join(self.lines[-200:]) or "(nothing logged)"
        return f"\n--- page {self.page.url.split('#', 1)[0]} log ---\n{body}\n--- end ---"


OpenPage = Callable[..., Awaitable[tuple[Page, PageLog]]]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium; its absence fails the test (CI installs it), never skips it."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
            "(run scripts/install-system, or apt-get install chromium); "
            "'playwright install' is not used",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """Headless Chromium with a fake camera and microphone; closed after the test.

    ``launch`` gives the browser a fresh, throwaway profile directory of its own
    (and ``open_page`` a fresh context per page).
    """
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(chromium),
            headless=True,
            args=list(CHROMIUM_ARGS),
            timeout=30_000,
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """``page, log = await open_page(url, locale="ru-RU")``: a new context and page with
    its log recorded (``log.dump()`` for assertion messages)."""
    contexts: list[BrowserContext] = []

    async def _open(url: str, *, locale: str = "ru-RU") -> tuple[Page, PageLog]:
        context = await browser.new_context(
            locale=locale,
            viewport={"width": 1280, "height": 720},
            permissions=["camera", "microphone"],
        )
        context.set_default_timeout(10_000)  # a missing element fails fast, not in 30 s
        contexts.append(context)
        page = await context.new_page()
        log = PageLog(page)
        await page.goto(url, wait_until="domcontentloaded")
        return page, log

    yield _open
    for context in contexts:
        await context.close()


def namespace_launcher(netns: str, directory: Path, chromium: Path = CHROMIUM) -> Path:
    """An executable that starts ``chromium`` inside the network namespace ``netns``.

    Give it to ``pw.chromium.launch(executable_path=...)``: ``ip netns exec`` keeps
    the file descriptors of Playwright's ``--remote-debugging-pipe``, so Playwright
    drives (and closes) a browser whose every socket lives in the namespace.
    """
    launcher = directory / f"chromium-in-{netns}"
    command = shlex.join(["ip", "netns", "exec", netns, str(chromium)])
    launcher.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    launcher.chmod(0o755)
    return launcher
