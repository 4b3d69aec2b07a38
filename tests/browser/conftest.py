"""Browser fixtures: Debian's Chromium driven by Python Playwright, with a fake camera.

Nothing is downloaded: Playwright drives ``/usr/bin/chromium`` (installed by
``scripts/install-system``), never a browser of its own (no ``playwright install``).
A missing Chromium is a failure, not a skip, so CI cannot silently test nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright

from media_server.linkemu import ShapedNamespace, cleanup_stale
from tests.services import KonsiliumServer

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

# Chromium inside a network namespace offers its real host candidate (10.77.N.2)
# rather than an mDNS name (a page that never asked for a camera gets mDNS names).
NETNS_ARGS = ("--disable-features=WebRtcHideLocalIpsWithMdns",)


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


# -- Chromium in a network namespace (a kernel rate limit on its link) -------------


@pytest.fixture
def netns() -> Iterator[ShapedNamespace]:
    """A participant's namespace; made before the server so its candidates include it."""
    cleanup_stale()  # namespaces of test runs that were killed
    with ShapedNamespace() as ns:
        yield ns


@pytest.fixture
def lan_server(tmp_path: Path, netns: ShapedNamespace) -> Iterator[KonsiliumServer]:
    """The server on every address: the namespace reaches it at ``netns.host_addr``."""
    with KonsiliumServer(tmp_path / "data", extra_args=("--host", "0.0.0.0")) as srv:
        yield srv


@pytest.fixture
async def ns_browser(
    chromium: Path, netns: ShapedNamespace, tmp_path: Path
) -> AsyncIterator[Browser]:
    """Headless Chromium whose sockets all live in ``netns``; closed after the test."""
    async with browser_in_netns(netns, chromium, tmp_path) as browser:
        yield browser


def media_origin_args(netns: ShapedNamespace, server: KonsiliumServer) -> tuple[str, ...]:
    """Chromium flags that let a page in ``netns`` use the camera and microphone.

    From the namespace the page loads from ``http://<netns.host_addr>:<port>``, not
    a secure context, so ``navigator.mediaDevices`` would be missing: Chromium is
    told to treat that one origin as secure.
    """
    origin = f"http://{netns.host_addr}:{server.port}"
    return (f"--unsafely-treat-insecure-origin-as-secure={origin}",)


@contextlib.asynccontextmanager
async def browser_in_netns(
    netns: ShapedNamespace, chromium: Path, directory: Path, *args: str
) -> AsyncIterator[Browser]:
    """Headless Chromium whose sockets all live in ``netns``, with ``args`` added."""
    launcher = namespace_launcher(netns.name, directory, chromium)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(launcher),
            headless=True,
            args=[*CHROMIUM_ARGS, *NETNS_ARGS, *args],
            timeout=60_000,
        )
        try:
            yield browser
        finally:
            await browser.close()


async def join(page: Page, log: PageLog, timeout: float) -> str:
    """Wait for the page's ``joined``; its participant id."""
    state: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await page.evaluate("() => window.konsilium ? window.konsilium.state() : {}")
        if state.get("joined"):
            return str(state["selfId"])
        await asyncio.sleep(0.2)
    raise AssertionError(f"the page did not join: {state}{log.dump()}")
