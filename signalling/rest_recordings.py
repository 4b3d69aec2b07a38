"""REST API of recordings for an integrating system (admin API key).

Every request that touches a recording — allowed or refused — is written to the
Store's audit log (actor ``admin-api`` for a valid key, ``anonymous`` else).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from recording.registry import UnknownRecording
from recording.render_jobs import RenderBusy

from .appkeys import RECORDINGS, RENDER_JOBS, ROOMS
from .errors import BadRequest, KonsiliumError, NotFound
from .protocol import CONSULTATION_ID_RE, PATIENT_REF_RE, ROOM_ID_RE
from .rest_body import read_json_object
from .rest_rooms import ADMIN_ACTOR, require_admin

T = TypeVar("T")
MAX_BODY_BYTES = 4096


async def _admin(request: web.Request, action: str, target: str) -> None:
    """require_admin, with the refusal on the audit log."""
    try:
        require_admin(request)
    except KonsiliumError as exc:
        await request.app[ROOMS].audit("anonymous", action, target, exc.code)
        raise


def _room(request: web.Request) -> str:
    room = request.match_info["room"]
    if not ROOM_ID_RE.match(room):
        raise NotFound("no such room")
    return room


async def _start_options(request: web.Request) -> dict[str, Any]:
    """The optional JSON body of a start: consultation_id, patient_ref, consent_required."""
    body = await read_json_object(request, MAX_BODY_BYTES)
    if body is None:
        return {}
    unknown = set(body) - {"consultation_id", "patient_ref", "consent_required"}
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    out: dict[str, Any] = {}
    for name, pattern in (("consultation_id", CONSULTATION_ID_RE), ("patient_ref", PATIENT_REF_RE)):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str) or not pattern.match(value):
                raise BadRequest(f"'{name}' is not valid")
            out[name] = value
    consent = body.get("consent_required")
    if consent is not None:
        if not isinstance(consent, bool):
            raise BadRequest("'consent_required' must be true or false")
        out["consent_required"] = consent
    return out


async def start_recording(request: web.Request) -> web.Response:
    room = _room(request)
    await _admin(request, "recording_start", room)
    options = await _start_options(request)
    rooms = request.app[ROOMS]
    try:
        recorder = await rooms.start_recording(room, started_by=ADMIN_ACTOR, **options)
    except KonsiliumError as exc:
        await rooms.audit(ADMIN_ACTOR, "recording_start", room, exc.code)
        raise
    return web.json_response({"room": room, **recorder.status()}, status=201)


async def stop_recording(request: web.Request) -> web.Response:
    room = _room(request)
    await _admin(request, "recording_stop", room)
    rooms = request.app[ROOMS]
    try:
        recorder, result = await rooms.stop_recording(room, by=ADMIN_ACTOR)
    except KonsiliumError as exc:
        await rooms.audit(ADMIN_ACTOR, "recording_stop", room, exc.code)
        raise
    return web.json_response(
        {
            "room": room,
            "recording_id": recorder.id,
            "reason": result.reason,
            "sealed": result.sealed,
            "tracks": result.tracks,
            "segments": result.segments,
            "worker_cpu_s": round(result.worker_cpu_s, 3),
            "loop_s": round(result.loop_s, 3),
        }
    )


async def list_recordings(request: web.Request) -> web.Response:
    await _admin(request, "recording_list", "*")
    recordings = request.app[RECORDINGS]
    found = await asyncio.to_thread(recordings.summaries)
    await request.app[ROOMS].audit(ADMIN_ACTOR, "recording_list", "*", "ok", count=len(found))
    return web.json_response(
        {"recordings": [{**s.to_json(), "active": recordings.is_active(s.id)} for s in found]}
    )


async def get_recording(request: web.Request) -> web.Response:
    recording_id = request.match_info["id"]
    await _admin(request, "recording_view", recording_id)
    recordings = request.app[RECORDINGS]
    summary = await _known(request, "recording_view", recordings.summary, recording_id)
    await request.app[ROOMS].audit(ADMIN_ACTOR, "recording_view", recording_id, "ok")
    return web.json_response({**summary.to_json(), "active": recordings.is_active(recording_id)})


async def verify_recording(request: web.Request) -> web.Response:
    recording_id = request.match_info["id"]
    await _admin(request, "recording_verify", recording_id)
    recordings = request.app[RECORDINGS]
    report = await _known(request, "recording_verify", recordings.verify, recording_id)
    await request.app[ROOMS].audit(ADMIN_ACTOR, "recording_verify", recording_id, report.status)
    return web.json_response(
        {"recording_id": recording_id, "active": recordings.is_active(recording_id)}
        | report.to_dict()
    )


async def _known(
    request: web.Request, action: str, read: Callable[[str], T], recording_id: str
) -> T:
    """Run a blocking read of one recording off the loop; 404 (audited) if there is none."""
    try:
        return await asyncio.to_thread(read, recording_id)
    except UnknownRecording:
        await request.app[ROOMS].audit(ADMIN_ACTOR, action, recording_id, "not_found")
        raise NotFound("no such recording") from None


RENDER_DEFAULTS = {"width": 1280, "height": 720, "fps": 15}
CANCEL_WAIT_S = 5.0


def _render_options(raw: bytes) -> dict[str, int]:
    """The optional JSON body of a render: width, height (even, 64..7680), fps (1..60)."""
    out = dict(RENDER_DEFAULTS)
    if not raw.strip():
        return out
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - set(RENDER_DEFAULTS)
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    for name, value in body.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"'{name}' must be an integer")
        out[name] = value
    if any(not 64 <= out[n] <= 7680 or out[n] % 2 for n in ("width", "height")):
        raise BadRequest("'width' and 'height' must be even, 64 to 7680")
    if not 1 <= out["fps"] <= 60:
        raise BadRequest("'fps' must be 1 to 60")
    return out


async def start_render(request: web.Request) -> web.Response:
    """Start a composite render of a recording in the background: 202, or 409 if one runs."""
    recording_id = request.match_info["id"]
    await _admin(request, "render_start", recording_id)
    rooms, recordings = request.app[ROOMS], request.app[RECORDINGS]
    directory = await _known(request, "render_start", recordings.directory, recording_id)
    raw = b""
    if request.can_read_body:
        raw = await request.content.read(MAX_BODY_BYTES + 1)
    try:
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes")
        options = _render_options(raw)
        if recordings.is_active(recording_id):
            raise KonsiliumError("the recording is still running", code="conflict", status=409)
        try:
            job = request.app[RENDER_JOBS].start(
                recording_id, directory, keyring=recordings.keyring, **options
            )
        except RenderBusy as exc:
            raise KonsiliumError(str(exc), code="render_running", status=409) from None
    except KonsiliumError as exc:
        await rooms.audit(ADMIN_ACTOR, "render_start", recording_id, exc.code)
        raise
    await rooms.audit(ADMIN_ACTOR, "render_start", recording_id, "ok", job_id=job.job_id, **options)
    return web.json_response(job.to_json(), status=202)


async def render_status(request: web.Request) -> web.Response:
    recording_id = request.match_info["id"]
    await _admin(request, "render_status", recording_id)
    job = request.app[RENDER_JOBS].get(recording_id)
    if job is None:
        await request.app[ROOMS].audit(ADMIN_ACTOR, "render_status", recording_id, "not_found")
        raise NotFound("no render of this recording")
    await request.app[ROOMS].audit(
        ADMIN_ACTOR, "render_status", recording_id, "ok", job_id=job.job_id, status=job.status
    )
    return web.json_response(job.to_json())


async def cancel_render(request: web.Request) -> web.Response:
    """Cancel the running render (waits a few seconds for it to stop); its latest status."""
    recording_id = request.match_info["id"]
    await _admin(request, "render_cancel", recording_id)
    jobs = request.app[RENDER_JOBS]
    job = jobs.cancel(recording_id)
    if job is None:
        await request.app[ROOMS].audit(ADMIN_ACTOR, "render_cancel", recording_id, "not_found")
        raise NotFound("no render of this recording")
    await jobs.wait(job, CANCEL_WAIT_S)
    await request.app[ROOMS].audit(
        ADMIN_ACTOR, "render_cancel", recording_id, "ok", job_id=job.job_id, status=job.status
    )
    return web.json_response(job.to_json())


async def public_key(request: web.Request) -> web.Response:
    """The key that seals manifests (PEM), for ``verify`` anywhere; public by design."""
    keys = request.app[RECORDINGS].keys
    return web.Response(
        text=keys.public_key_pem(),
        content_type="application/x-pem-file",
        headers={"X-Key-Fingerprint": keys.fingerprint()},
    )


def add_recording_routes(app: web.Application) -> None:
    app.router.add_post("/api/rooms/{room}/recording", start_recording)
    app.router.add_delete("/api/rooms/{room}/recording", stop_recording)
    app.router.add_get("/api/recordings", list_recordings)
    app.router.add_get("/api/recordings/public-key", public_key)
    app.router.add_get("/api/recordings/{id}", get_recording)
    app.router.add_get("/api/recordings/{id}/verify", verify_recording)
    app.router.add_post("/api/recordings/{id}/render", start_render)
    app.router.add_get("/api/recordings/{id}/render", render_status)
    app.router.add_delete("/api/recordings/{id}/render", cancel_render)
