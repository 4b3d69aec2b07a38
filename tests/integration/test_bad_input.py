"""Refusals and garbage: a clear error, a close code, and nobody else disturbed."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from media_server.bot import Bot
from media_server.clip import Clip
from signalling.auth import TokenAuthority
from tests.services import KonsiliumServer


async def _ws(
    server: KonsiliumServer,
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(server.url.replace("http", "ws") + "/ws")
    return session, ws


async def _next_error(ws: aiohttp.ClientWebSocketResponse, wait: float = 5) -> dict[str, Any]:
    while True:
        msg = await asyncio.wait_for(ws.receive(), wait)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected an error message, got {msg.type}"
        data = json.loads(msg.data)
        if data["type"] == "error":
            return dict(data)


async def _refused(server: KonsiliumServer, join: dict[str, Any]) -> tuple[str, int | None]:
    session, ws = await _ws(server)
    try:
        await ws.send_json(join)
        error = await _next_error(ws)
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        return str(error["code"]), ws.close_code
    finally:
        await session.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(server: KonsiliumServer, **overrides: Any) -> dict[str, Any]:
    token = server.mint("x")
    claims = dict(jwt.decode(token, options={"verify_signature": False}))
    claims.update(overrides)
    return claims


def _sign(server: KonsiliumServer, claims: dict[str, Any]) -> str:
    key = TokenAuthority.load_or_create(server.data_dir)
    return jwt.encode(claims, key._private_key, algorithm="EdDSA")


@pytest.mark.parametrize(
    ("case", "code", "close"),
    [
        ("expired", "token_expired", 4401),
        ("not_yet_valid", "token_not_yet_valid", 4401),
        ("forged", "invalid_token", 4401),
        ("alg_none", "invalid_token", 4401),
        ("wrong_room", "wrong_room", 4403),
        ("no_join_grant", "forbidden", 4403),
        ("garbage", "invalid_token", 4401),
        ("bad_version", "unsupported_version", 4400),
    ],
)
async def test_join_refusals(server: KonsiliumServer, case: str, code: str, close: int) -> None:
    now = int(time.time())
    room = "room-1"
    version = 1
    if case == "expired":
        token = _sign(server, _claims(server, exp=now - 60, iat=now - 120))
    elif case == "not_yet_valid":
        token = _sign(server, _claims(server, nbf=now + 600))
    elif case == "forged":
        token = jwt.encode(_claims(server), Ed25519PrivateKey.generate(), algorithm="EdDSA")
    elif case == "alg_none":
        header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        token = f"{header}.{_b64(json.dumps(_claims(server)).encode())}."
    elif case == "wrong_room":
        token = server.mint("x", room="other-room")
    elif case == "no_join_grant":
        token = server.mint("x", grants=("subscribe",))
    elif case == "garbage":
        token = "not.a.token"
    else:
        token = server.mint("x")
        version = 2
    got_code, got_close = await _refused(
        server, {"type": "join", "v": version, "room": room, "token": token}
    )
    assert (got_code, got_close) == (code, close)
    # the refusal is logged without the token
    await asyncio.sleep(0.2)
    log = server.log_text()
    assert token not in log
    if case != "bad_version":
        assert code in log


async def test_first_message_must_be_join(server: KonsiliumServer) -> None:
    code, close = await _refused(server, {"type": "ping"})
    assert (code, close) == ("not_joined", 4401)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("not json", "JSON"),
        ("[1, 2]", "object"),
        ('{"type": "dance"}', "unknown message type"),
        ('{"type": "mute", "source": "camera"}', "'muted' is required"),
        ('{"type": "mute", "source": "toaster", "muted": true}', "'source'"),
        ('{"type": "publish_offer", "sdp": "v=0", "tracks": "x"}', "'tracks'"),
        ('{"type": "subscribe_answer", "sdp": 5}', "'sdp'"),
    ],
)
async def test_malformed_messages_get_a_named_error(
    server: KonsiliumServer, payload: str, fragment: str
) -> None:
    session, ws = await _ws(server)
    try:
        await ws.send_json({"type": "join", "v": 1, "room": "room-1", "token": server.mint("x")})
        await ws.send_str(payload)
        error = await _next_error(ws)
        assert error["code"] in ("bad_message", "bad_sdp")
        assert fragment in error["message"]
        # still connected and served
        await ws.send_json({"type": "ping", "ts": 7})
        while True:
            msg = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
            if msg["type"] == "pong":
                assert msg["ts"] == 7
                break
    finally:
        await session.close()


async def test_oversized_message_is_refused(server: KonsiliumServer) -> None:
    session, ws = await _ws(server)
    try:
        await ws.send_json({"type": "join", "v": 1, "room": "room-1", "token": server.mint("x")})
        await ws.send_str(json.dumps({"type": "ping", "pad": "x" * (200 * 1024)}))
        msg = await asyncio.wait_for(ws.receive(), 5)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009  # message too big
    finally:
        await session.close()


async def test_garbage_sdp_and_flooding_do_not_disturb_another_room(
    server: KonsiliumServer, clip: Clip
) -> None:
    a = Bot(server.url, "room-1", server.mint("a"), clip=clip)
    b = Bot(server.url, "room-1", server.mint("b"), clip=clip)
    await a.start()
    await b.start()
    session, ws = await _ws(server)
    try:
        assert await a.wait_until(lambda: a.stats.frames_from("b") > 10, 10)
        await ws.send_json(
            {"type": "join", "v": 1, "room": "room-2", "token": server.mint("evil", room="room-2")}
        )
        await ws.send_json({"type": "publish_offer", "sdp": "v=0\r\ngarbage\r\n", "tracks": []})
        error = await _next_error(ws)
        assert error["code"] == "bad_sdp"
        await ws.send_json(
            {
                "type": "publish_offer",
                "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
                "tracks": [{"mid": "0", "source": "camera"}],
            }
        )
        error = await _next_error(ws)
        assert error["code"] == "bad_sdp"
        before = a.stats.frames_from("b")
        for _ in range(20):
            if ws.closed:
                break
            await ws.send_str("garbage")
        # the flooder is cut off...
        msg = await asyncio.wait_for(ws.receive(), 5)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await asyncio.wait_for(ws.receive(), 5)
        assert ws.close_code == 4400
        # ...and the council next door never noticed
        await asyncio.sleep(1)
        assert a.stats.frames_from("b") > before + 20
        assert not a.errors and not b.errors
    finally:
        await session.close()
        await a.stop()
        await b.stop()


async def test_publish_without_grant_is_forbidden(server: KonsiliumServer, clip: Clip) -> None:
    session, ws = await _ws(server)
    try:
        token = server.mint("observer", grants=("join", "subscribe"))
        await ws.send_json({"type": "join", "v": 1, "room": "room-1", "token": token})
        await ws.send_json({"type": "publish_offer", "sdp": "v=0\r\n", "tracks": []})
        error = await _next_error(ws)
        assert error["code"] == "forbidden"
    finally:
        await session.close()


async def test_join_timeout(server: KonsiliumServer) -> None:
    session, ws = await _ws(server)
    try:
        t0 = time.monotonic()
        error = await _next_error(ws, wait=15)
        assert error["code"] == "join_timeout"
        assert 9 <= time.monotonic() - t0 <= 13
    finally:
        await session.close()
