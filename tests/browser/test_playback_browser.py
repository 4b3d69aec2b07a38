"""The recording player page in real Chromium: the link's token becomes a cookie, the
decrypted tracks play (HTTP Range from an encrypted recording), the timeline seeks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recording.keyring import Keyring, append_new_key
from tests.browser.conftest import OpenPage
from tests.integration.test_playback import RECORDING_ID, ROOM, make_recording
from tests.services import KonsiliumServer


@pytest.fixture
def encrypted_server(tmp_path: Path) -> Iterator[tuple[KonsiliumServer, Keyring]]:
    key_file = tmp_path / "recording.keys"
    append_new_key(key_file)
    extra = ("--recording-key-file", str(key_file))
    with KonsiliumServer(tmp_path / "data", extra_args=extra) as srv:
        yield srv, Keyring.load(key_file)


async def test_tracks_play_in_chromium_and_the_timeline_seeks(
    encrypted_server: tuple[KonsiliumServer, Keyring], open_page: OpenPage
) -> None:
    server, ring = encrypted_server
    make_recording(server.data_dir, ring)
    token = server.mint("records-officer", room=ROOM, grants=("view_recordings",))
    page, log = await open_page(f"{server.url}/recordings/{RECORDING_ID}#t={token}")
    await page.wait_for_selector('#playback[data-mode="player"]', timeout=15_000)
    assert "#" not in page.url and token not in page.url, log.dump()
    assert await page.evaluate("document.cookie") == "", "the cookie must be HttpOnly"
    await page.wait_for_selector("text=Анна Иванова")

    video = page.locator('video[src$="/media/tracks/anna.camera"]')
    audio = page.locator('audio[src$="/media/tracks/boris.microphone"]')
    for element in (video, audio):
        await element.evaluate("m => { m.muted = true; return m.play(); }")
    ready = await page.wait_for_function(
        """() => [...document.querySelectorAll('.player')]
                 .filter(m => m.readyState >= 2 && m.currentTime > 0.3).length >= 2""",
        timeout=15_000,
    )
    assert await ready.json_value(), log.dump()
    size = await video.evaluate("v => [v.videoWidth, v.videoHeight, v.duration]")
    assert size[:2] == [320, 180] and abs(size[2] - 3.0) < 0.5, size

    await video.evaluate("v => v.pause()")
    await page.locator('li[data-kind="mute"] button.seek').click()
    at = await video.evaluate("v => v.currentTime")
    assert abs(at - 2.0) < 0.2, at
    errors = [line for line in log.lines if "pageerror" in line]
    assert not errors, log.dump()
