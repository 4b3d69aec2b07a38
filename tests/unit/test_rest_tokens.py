"""POST /api/tokens and GET /api/keys/token through a real aiohttp test client."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signalling.appkeys import SETTINGS, TOKENS
from signalling.auth import Grant, Tier, TokenAuthority
from signalling.rest_tokens import add_token_routes
from signalling.settings import Settings

ADMIN_KEY = "admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

ClientFactory = Callable[..., AbstractAsyncContextManager[TestClient[web.Request, web.Application]]]


@pytest.fixture
def authority() -> TokenAuthority:
    return TokenAuthority(Ed25519PrivateKey.generate())


@pytest.fixture
def make_client(authority: TokenAuthority) -> ClientFactory:
    @asynccontextmanager
    async def factory(
        admin_api_key: str | None = ADMIN_KEY,
    ) -> AsyncIterator[TestClient[web.Request, web.Application]]:
        app = web.Application()
        app[SETTINGS] = Settings(admin_api_key=admin_api_key, token_ttl=3600)
        app[TOKENS] = authority
        add_token_routes(app)
        async with TestClient(TestServer(app)) as client:
            yield client

    return factory


def body(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "sub": "u-42",
        "name": "Петров И. С.",
        "clinic": "ЦРБ Билибино",
        "tier": "district",
        "room": "council-7",
        "grants": ["join", "publish", "subscribe"],
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


async def error_of(resp: Any) -> tuple[int, str, str]:
    data = await resp.json()
    return resp.status, data["error"]["code"], data["error"]["message"]


async def test_minting_is_disabled_without_an_admin_key(make_client: ClientFactory) -> None:
    async with make_client(admin_api_key=None) as client:
        resp = await client.post("/api/tokens", json=body(), headers=AUTH)
        status, code, _ = await error_of(resp)
        assert (status, code) == (403, "disabled")
        resp = await client.post("/api/tokens", json=body(), headers={"Authorization": "Bearer "})
        assert (await error_of(resp))[:2] == (403, "disabled")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"Authorization": ADMIN_KEY},
        {"Authorization": f"Bearer {ADMIN_KEY}x"},
        {"Authorization": "Bearer ключ"},
    ],
    ids=["none", "wrong", "basic", "no-scheme", "longer", "non-ascii"],
)
async def test_wrong_or_missing_admin_key_is_unauthorized(
    make_client: ClientFactory, headers: dict[str, str]
) -> None:
    async with make_client() as client:
        resp = await client.post("/api/tokens", json=body(), headers=headers)
        status, code, message = await error_of(resp)
        assert (status, code) == (401, "unauthorized")
        assert ADMIN_KEY not in message


async def test_success_mints_a_token_the_authority_verifies(
    make_client: ClientFactory, authority: TokenAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with make_client() as client:
        before = int(time.time())
        resp = await client.post(
            "/api/tokens",
            json=body(grants=["join", "chair", "publish"], ttl_s=900),
            headers={"Authorization": f"bearer {ADMIN_KEY}"},
        )
        assert resp.status == 201, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        data = await resp.json()
    claims = authority.verify(data["token"], room="council-7", require=Grant.CHAIR)
    assert claims.sub == "u-42"
    assert claims.name == "Петров И. С."
    assert claims.clinic == "ЦРБ Билибино"
    assert claims.tier is Tier.DISTRICT
    assert claims.grants == {Grant.JOIN, Grant.CHAIR, Grant.PUBLISH}
    assert claims.role == "chair"
    assert data["expires_at"] == claims.exp
    assert before + 900 <= claims.exp <= int(time.time()) + 900
    assert data["token"] not in caplog.text
    assert "u-42" in caplog.text  # the mint is logged for the audit trail


async def test_ttl_defaults_to_the_configured_token_ttl(
    make_client: ClientFactory, authority: TokenAuthority
) -> None:
    async with make_client() as client:
        resp = await client.post("/api/tokens", json=body(clinic=""), headers=AUTH)
        assert resp.status == 201
        claims = authority.verify((await resp.json())["token"])
    assert claims.exp - claims.iat == 3600
    assert claims.clinic == ""


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(sub=None), "sub"),
        (body(sub=""), "sub"),
        (body(sub=42), "sub"),
        (body(name="x" * 257), "name"),
        (body(clinic=None), "clinic"),
        (body(clinic=["ФАП"]), "clinic"),
        (body(tier="provincial"), "tier"),
        (body(tier=None), "tier"),
        (body(room="council 7"), "room"),
        (body(room="x" * 129), "room"),
        (body(room="../etc"), "room"),
        (body(grants=[]), "grants"),
        (body(grants="join"), "grants"),
        (body(grants=["join", "admin"]), "grants"),
        (body(grants=[1]), "grants"),
        (body(ttl_s=59), "ttl_s"),
        (body(ttl_s=86401), "ttl_s"),
        (body(ttl_s="600"), "ttl_s"),
        (body(ttl_s=True), "ttl_s"),
        (body(ttl_s=600.5), "ttl_s"),
        (body(extra=1), "extra"),
    ],
    ids=repr,
)
async def test_bad_fields_are_named(
    make_client: ClientFactory, payload: dict[str, Any], field: str
) -> None:
    async with make_client() as client:
        resp = await client.post("/api/tokens", json=payload, headers=AUTH)
        status, code, message = await error_of(resp)
    assert (status, code) == (400, "bad_request")
    assert f"'{field}'" in message


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe"])
async def test_a_body_that_is_not_a_json_object_is_refused(
    make_client: ClientFactory, raw: bytes
) -> None:
    async with make_client() as client:
        resp = await client.post("/api/tokens", data=raw, headers=AUTH)
        assert (await error_of(resp))[:2] == (400, "bad_request")


async def test_a_huge_body_is_refused_without_minting(make_client: ClientFactory) -> None:
    huge = json.dumps(body(name="x" * 20_000)).encode()
    async with make_client() as client:
        resp = await client.post("/api/tokens", data=huge, headers=AUTH)
        status, code, message = await error_of(resp)
        assert (status, code) == (413, "bad_request")
        assert "16384" in message

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
            for _ in range(20):
                yield b" " * 1024

        resp = await client.post("/api/tokens", data=chunks(), headers=AUTH)
        assert (await error_of(resp))[:2] == (413, "bad_request")

        padded = json.dumps(body()).encode().ljust(16 * 1024)  # exactly at the limit is fine
        resp = await client.post("/api/tokens", data=padded, headers=AUTH)
        assert resp.status == 201


async def test_public_key_verifies_minted_tokens(
    make_client: ClientFactory, authority: TokenAuthority
) -> None:
    token = authority.mint(
        sub="u-1", name="n", clinic="c", tier=Tier.FEDERAL, room="r", grants=[Grant.JOIN], ttl_s=60
    )
    async with make_client(admin_api_key=None) as client:
        resp = await client.get("/api/keys/token")
        assert resp.status == 200
        pem = await resp.text()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    decoded = jwt.decode(token, pem, algorithms=["EdDSA"], audience="konsilium")
    assert decoded["sub"] == "u-1"
