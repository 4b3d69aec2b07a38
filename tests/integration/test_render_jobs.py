"""Composite render as a background job through REST, against a real ``konsilium serve``.

A 3 s, 320x180 synthetic recording (two participants, VP8 + Opus, written with
TrackWriter and Manifest as the Recorder does) is placed in the server's data
dir; the render is started, polled to the end, and the output decoded back.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from recording.manifest import Manifest
from tests.media import solid_vp8, tone_opus, write_track
from tests.services import KonsiliumServer

ADMIN = {"Authorization": "Bearer test-admin-key"}
RECORDING_ID = "rec-render-1"
SECONDS = 3.0
PEOPLE = [
    ("anna", "Anna Ivanova", (220, 40, 40), 400),
    ("boris", "Борис Петров", (40, 200, 40), 600),
]


def make_recording(data_dir: Path) -> Path:
    directory = data_dir / "recordings" / RECORDING_ID
    directory.mkdir(parents=True)
    with Manifest(directory) as manifest:
        manifest.recording_started(recording_id=RECORDING_ID, room="council", consultation_id="c-1")
        for pid, name, _, _ in PEOPLE:
            manifest.participant(pid, name=name, clinic="Clinic", tier="lan", role="doctor")
            manifest.event("join", {"offset_s": 0.0}, participant_id=pid)
        for pid, _, rgb, tone in PEOPLE:
            write_track(manifest, directory, pid, "audio", tone_opus(tone, 0.2, SECONDS))
            write_track(manifest, directory, pid, "video", solid_vp8(rgb, SECONDS))
        manifest.recording_stopped()
    return directory


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await resp.json()
    assert isinstance(body, dict)
    return body


async def _poll(
    http: aiohttp.ClientSession, url: str, timeout: float = 60.0
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(url) as resp:
            assert resp.status == 200
            seen.append(await _json(resp))
        if seen[-1]["status"] != "running":
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"render still running after {timeout} s: {seen[-1]}")


async def test_render_job_over_rest(server: KonsiliumServer) -> None:
    directory = make_recording(server.data_dir)
    url = f"{server.url}/api/recordings/{RECORDING_ID}/render"
    async with aiohttp.ClientSession(headers=ADMIN) as http:
        async with http.get(url) as resp:  # nothing started yet
            assert resp.status == 404
        async with http.post(url, json={"width": 640, "height": 360, "fps": 15}) as resp:
            assert resp.status == 202, await resp.text()
            started = await _json(resp)
        assert started["status"] == "running" and started["progress"] == 0
        assert started["job_id"]
        async with http.post(url) as resp:  # one at a time per recording
            assert resp.status == 409, await resp.text()
        seen = await _poll(http, url)

    final = seen[-1]
    assert final["status"] == "done", final
    assert final["job_id"] == started["job_id"]
    progress = [0.0] + [s["progress"] for s in seen]
    assert progress == sorted(progress), progress  # never goes back
    assert any(0 < p < 1 for p in progress), progress  # reported on the way
    assert final["progress"] == 1.0
    assert final["duration_s"] == pytest.approx(SECONDS, abs=0.2)
    assert final["speed_x"] > 0
    out = directory / "composite.webm"
    assert final["size"] == out.stat().st_size > 0
    assert not (directory / "composite.webm.part").exists()
    with av.open(str(out)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        video = container.streams.video[0]
        assert (video.codec_context.width, video.codec_context.height) == (640, 360)
        assert sum(1 for _ in container.decode(video=0)) >= 40


async def test_render_job_refusals_and_cancel(server: KonsiliumServer) -> None:
    directory = make_recording(server.data_dir)
    url = f"{server.url}/api/recordings/{RECORDING_ID}/render"
    async with aiohttp.ClientSession() as anonymous:
        for method in ("POST", "GET", "DELETE"):
            async with anonymous.request(method, url) as resp:
                assert resp.status == 401, method
    async with aiohttp.ClientSession(headers=ADMIN) as http:
        for unknown in ("no-such-recording", "..%2F..%2Fetc"):
            async with http.post(f"{server.url}/api/recordings/{unknown}/render") as resp:
                assert resp.status == 404, unknown
        for body in ({"width": 641}, {"fps": 0}, {"height": "360"}, {"speed": 2}, [1]):
            async with http.post(url, json=body) as resp:
                assert resp.status == 400, body
        async with http.delete(url) as resp:  # nothing to cancel
            assert resp.status == 404

        async with http.post(url, json={"width": 1280, "height": 720, "fps": 30}) as resp:
            assert resp.status == 202
        async with http.delete(url) as resp:
            assert resp.status == 200
            cancelled = await _json(resp)
        assert cancelled["status"] == "cancelled", cancelled
        assert not (directory / "composite.webm").exists()
        assert not (directory / "composite.webm.part").exists()
        async with http.post(url, json={"width": 320, "height": 180, "fps": 5}) as resp:
            assert resp.status == 202  # a cancelled job does not block the next
        final = (await _poll(http, url))[-1]
        assert final["status"] == "done", final


async def test_closing_the_server_cancels_a_running_render(server: KonsiliumServer) -> None:
    directory = make_recording(server.data_dir)
    url = f"{server.url}/api/recordings/{RECORDING_ID}/render"
    async with aiohttp.ClientSession(headers=ADMIN) as http:
        async with http.post(url, json={"width": 1920, "height": 1080, "fps": 60}) as resp:
            assert resp.status == 202
        deadline = time.monotonic() + 30
        while True:
            async with http.get(url) as resp:
                status = await _json(resp)
            assert status["status"] == "running", status
            if status["progress"] > 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    started = time.monotonic()
    await asyncio.to_thread(server.stop)  # SIGTERM: the app's cleanup cancels the job
    assert time.monotonic() - started < 8
    assert re.search(rf"render of {RECORDING_ID} \(\w+\) cancelled", server.log_text())
    assert not (directory / "composite.webm").exists()
    assert not (directory / "composite.webm.part").exists()
