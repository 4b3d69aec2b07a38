"""Playback of a recording in the browser's terms: page, access, Range media, audit.

A real ``konsilium serve`` (recordings encrypted at rest, audit in a real
redis-server so the test can read it) and a synthetic two-person recording made
with TrackWriter and Manifest as the Recorder does.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from recording.keyring import Keyring, append_new_key
from recording.manifest import Manifest, RecordingKeys
from recording.playback import track_copy_path
from recording.storage import read_media
from signalling.store import Store
from signalling.store_factory import open_store
from tests.media import solid_vp8, tone_opus, write_track
from tests.services import KonsiliumServer, RedisServer

RECORDING_ID = "rec-play-1"
ROOM = "council-3"
SECONDS = 3.0
PEOPLE = [
    ("anna", "Анна Иванова", (220, 40, 40), 400),
    ("boris", "Boris Petrov", (40, 200, 40), 600),
]
ADMIN = {"Authorization": "Bearer test-admin-key"}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "recording.keys"
    append_new_key(path)
    return path


@pytest.fixture
def server(tmp_path: Path, redis: RedisServer, key_file: Path) -> Iterator[KonsiliumServer]:
    extra = ("--redis-url", redis.url, "--recording-key-file", str(key_file))
    with KonsiliumServer(tmp_path / "data", extra_args=extra) as srv:
        yield srv


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[Store]:
    opened = await open_store(redis.url)
    yield opened
    await opened.close()


def make_recording(data_dir: Path, ring: Keyring) -> Path:
    directory = data_dir / "recordings" / RECORDING_ID
    directory.mkdir(parents=True)
    with Manifest(directory, key=ring.active) as manifest:
        manifest.recording_started(recording_id=RECORDING_ID, room=ROOM, consultation_id="c-9")
        for pid, name, _, _ in PEOPLE:
            manifest.participant(pid, name=name, clinic="ЦРБ", tier="district", role="consultant")
            manifest.event("join", {"offset_s": 0.0}, participant_id=pid)
            manifest.consent(pid, granted=True)
        for pid, _, rgb, tone in PEOPLE:
            write_track(
                manifest, directory, pid, "audio", tone_opus(tone, 0.2, SECONDS), key=ring.active
            )
            write_track(manifest, directory, pid, "video", solid_vp8(rgb, SECONDS), key=ring.active)
        manifest.event("mute", {"offset_s": 2.0, "source": "camera"}, participant_id="boris")
        manifest.recording_stopped()
        manifest.seal(RecordingKeys.load_or_create(data_dir).private_key)
    return directory


def viewer_token(server: KonsiliumServer, *grants: str, room: str = ROOM) -> str:
    return server.mint("records-officer", room=room, grants=grants or ("view_recordings",))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def audit_of(store: Store, action: str) -> list[Any]:
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in await store.list_audit(500, action) if e.target == RECORDING_ID]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_view_recordings_grant_page_range_media_and_audit(
    server: KonsiliumServer, key_file: Path, store: Store
) -> None:
    ring = Keyring.load(key_file)
    directory = make_recording(server.data_dir, ring)
    page = f"{server.url}/recordings/{RECORDING_ID}"
    track = f"{page}/media/tracks/anna.camera"
    async with aiohttp.ClientSession() as http:
        # no token: the page that takes the link's token, and nothing of the recording
        async with http.get(page) as resp:
            assert resp.status == 200
            html = await resp.text()
        assert 'data-mode="access"' in html and "Анна" not in html
        async with http.get(track) as resp:
            assert resp.status == 401

        # a token without view_recordings, or for another room: 403, page and media
        for token in (viewer_token(server, "join", "subscribe"), viewer_token(server, room="x")):
            async with http.get(page, headers=bearer(token)) as resp:
                assert resp.status == 403
                assert "Анна" not in await resp.text()
            async with http.get(track, headers=bearer(token)) as resp:
                assert resp.status == 403
        async with http.get(
            f"{server.url}/recordings/rec-nope", headers=bearer(viewer_token(server))
        ) as resp:
            assert resp.status == 404

        # with the grant: the page (Russian by default, English on request)
        token = viewer_token(server)
        async with http.get(page, headers=bearer(token)) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Cache-Control"] == "no-store"
            html = await resp.text()
        for text in (
            "Анна Иванова",
            "Boris Petrov",
            "Запись начата",
            "Дорожки участников",
            "камера",
        ):
            assert text in html, text
        assert f'src="/recordings/{RECORDING_ID}/media/tracks/anna.camera"' in html
        assert 'data-kind="mute"' in html and 'data-seek="2.0"' in html
        async with http.get(f"{page}?lang=en", headers=bearer(token)) as resp:
            html_en = await resp.text()
        assert "Recording started" in html_en and "Timeline" in html_en

        # media: whole and by range, decrypted
        async with http.get(track, headers=bearer(token)) as resp:
            assert resp.status == 200 and resp.headers["Accept-Ranges"] == "bytes"
            whole = await resp.read()
        assert whole == read_media(track_copy_path(directory, "anna.camera"), ring)
        with av.open(io.BytesIO(whole), "r") as container:
            assert sum(1 for _ in container.decode(video=0)) == round(SECONDS * 15)
        async with http.get(track, headers={**bearer(token), "Range": "bytes=100-1099"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 100-1099/{len(whole)}"
            assert await resp.read() == whole[100:1100]
        async with http.get(track, headers={**bearer(token), "Range": "bytes=-10"}) as resp:
            assert resp.status == 206 and await resp.read() == whole[-10:]
        async with http.get(
            track, headers={**bearer(token), "Range": f"bytes={len(whole)}-"}
        ) as resp:
            assert resp.status == 416

        # a browser: the token once in a header, then an HttpOnly cookie for this recording
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.post(f"{page}/session", headers=bearer(token)) as resp:
            assert resp.status == 204
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert f"Path=/recordings/{RECORDING_ID}" in cookie
        async with browser.get(track, headers={"Range": "bytes=0-9"}) as resp:
            assert resp.status == 206 and await resp.read() == whole[:10]
        async with browser.get(page) as resp:
            assert "Анна Иванова" in await resp.text()

        # with a composite, the page plays it
        async with browser.post(
            f"{server.url}/api/recordings/{RECORDING_ID}/render",
            json={"width": 320, "height": 180, "fps": 10},
            headers=ADMIN,
        ) as resp:
            assert resp.status == 202
        for _ in range(300):
            async with browser.get(
                f"{server.url}/api/recordings/{RECORDING_ID}/render", headers=ADMIN
            ) as resp:
                job = await resp.json()
            if job["status"] != "running":
                break
            await asyncio.sleep(0.1)
        assert job["status"] == "done", job
        async with browser.get(page) as resp:
            html = await resp.text()
        assert f'src="/recordings/{RECORDING_ID}/media/composite"' in html
        async with browser.get(f"{page}/media/composite", headers={"Range": "bytes=0-3"}) as resp:
            assert (
                resp.status == 206 and await resp.read() == b"\x1a\x45\xdf\xa3"
            )  # EBML: decrypted
            assert resp.headers["Content-Range"].endswith(f"/{job['size']}")

    # every access is in the audit log, refusals too, and no token is
    media = await audit_of(store, "recording_media")
    outcomes = [(e.actor, e.outcome) for e in media]
    assert ("records-officer", "ok") in outcomes
    assert ("anonymous", "unauthorized") in outcomes  # no token
    assert ("records-officer", "forbidden") in outcomes  # a token without the grant
    assert ("records-officer", "wrong_room") in outcomes  # the grant, for another room
    ranges = {e.detail.get("range") for e in media if e.outcome == "ok"}
    assert {"bytes=100-1099", "bytes=0-9", "bytes=0-3"} <= ranges
    assert {"track:anna.camera", "composite"} <= {e.detail.get("item") for e in media}
    views = await audit_of(store, "recording_playback_view")
    assert {"ok", "forbidden", "wrong_room"} <= {e.outcome for e in views}
    assert [e.outcome for e in await audit_of(store, "recording_playback_session")] == ["ok"]
    everything = " ".join(repr(e) for e in await store.list_audit(1000))
    assert token not in everything and token.split(".")[2] not in everything
