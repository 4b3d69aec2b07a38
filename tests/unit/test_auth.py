"""Room tokens: what is accepted, what is refused and with which code, key storage, logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signalling.auth import (
    AuthError,
    Claims,
    Grant,
    KeyFileError,
    Tier,
    TokenAuthority,
)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def authority(key: Ed25519PrivateKey) -> TokenAuthority:
    return TokenAuthority(key)


def payload(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "konsilium",
        "aud": "konsilium",
        "sub": "u-1",
        "name": "Иванова А. П.",
        "clinic": "ФАП Анадырь",
        "tier": "district",
        "room": "council-1",
        "grants": ["join", "publish", "subscribe"],
        "iat": now,
        "exp": now + 600,
        "jti": "abc",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(key: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key, algorithm="EdDSA")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())


def refused(authority: TokenAuthority, token: Any, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        authority.verify(token, **kwargs)
    return info.value


def mint(authority: TokenAuthority, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "sub": "u-1",
        "name": "Иванова А. П.",
        "clinic": "ФАП Анадырь",
        "tier": Tier.DISTRICT,
        "room": "council-1",
        "grants": [Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE],
        "ttl_s": 600,
    }
    args.update(overrides)
    return authority.mint(**args)


# -- accepted ----------------------------------------------------------------------


def test_minted_token_round_trips(authority: TokenAuthority) -> None:
    before = int(time.time())
    token = mint(authority)
    claims = authority.verify(token, room="council-1", require=Grant.PUBLISH)
    assert claims == Claims(
        sub="u-1",
        name="Иванова А. П.",
        clinic="ФАП Анадырь",
        tier=Tier.DISTRICT,
        room="council-1",
        grants=frozenset({Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE}),
        exp=claims.iat + 600,
        iat=claims.iat,
        nbf=None,
        jti=claims.jti,
    )
    assert before <= claims.iat <= int(time.time())
    assert claims.jti and claims.jti != authority.verify(mint(authority)).jti


def test_minted_token_carries_the_documented_claims(authority: TokenAuthority) -> None:
    token = mint(authority, not_before=int(time.time()) - 1)
    header = jwt.get_unverified_header(token)
    body = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "EdDSA"
    assert body["iss"] == "konsilium" and body["aud"] == "konsilium"
    assert body["grants"] == ["join", "publish", "subscribe"]
    assert body["tier"] == "district"
    assert set(body) == {
        *("iss", "aud", "sub", "name", "clinic", "tier", "room", "grants"),
        *("iat", "exp", "nbf", "jti"),
    }


def test_a_token_from_the_same_key_in_another_authority_verifies(key: Ed25519PrivateKey) -> None:
    token = mint(TokenAuthority(key))
    assert TokenAuthority(key).verify(token).sub == "u-1"


@pytest.mark.parametrize(
    ("grants", "role"),
    [
        ({Grant.JOIN, Grant.PUBLISH, Grant.CHAIR}, "chair"),
        ({Grant.JOIN, Grant.CHAIR}, "chair"),
        ({Grant.JOIN, Grant.SUBSCRIBE}, "observer"),
        ({Grant.JOIN, Grant.PUBLISH, Grant.SUBSCRIBE}, "consultant"),
    ],
)
def test_role_follows_grants(authority: TokenAuthority, grants: set[Grant], role: str) -> None:
    claims = authority.verify(mint(authority, grants=grants))
    assert claims.role == role
    assert claims.has(Grant.JOIN)
    assert claims.has(Grant.RECORD) is False


def test_expiry_and_not_before_within_leeway_are_accepted(
    key: Ed25519PrivateKey, authority: TokenAuthority
) -> None:
    now = int(time.time())
    assert authority.verify(sign(key, payload(exp=now - 2))).exp == now - 2
    assert authority.verify(sign(key, payload(nbf=now + 2))).nbf == now + 2


# -- refused -----------------------------------------------------------------------


def test_expired_token_is_refused(key: Ed25519PrivateKey, authority: TokenAuthority) -> None:
    now = int(time.time())
    exc = refused(authority, sign(key, payload(iat=now - 700, exp=now - 60)))
    assert exc.code == "token_expired"
    assert "expired" in exc.message


def test_token_before_nbf_is_refused(authority: TokenAuthority) -> None:
    token = mint(authority, not_before=int(time.time()) + 60)
    assert refused(authority, token).code == "token_not_yet_valid"


def test_token_issued_in_the_future_is_refused(
    key: Ed25519PrivateKey, authority: TokenAuthority
) -> None:
    token = sign(key, payload(iat=int(time.time()) + 120))
    assert refused(authority, token).code == "token_not_yet_valid"


def test_token_signed_by_another_key_is_refused(authority: TokenAuthority) -> None:
    other = TokenAuthority(Ed25519PrivateKey.generate())
    exc = refused(authority, mint(other))
    assert exc.code == "invalid_token"
    assert "signature" in exc.message


def test_tampered_payload_is_refused(key: Ed25519PrivateKey, authority: TokenAuthority) -> None:
    header, _, signature = sign(key, payload()).split(".")
    forged_body = b64(json.dumps(payload(grants=["join", "chair"])).encode())
    exc = refused(authority, f"{header}.{forged_body}.{signature}")
    assert exc.code == "invalid_token"


def test_alg_none_is_refused(authority: TokenAuthority) -> None:
    token = unsigned({"alg": "none", "typ": "JWT"}, payload()) + "."
    assert refused(authority, token).code == "invalid_token"


def test_hs256_signed_with_the_public_key_is_refused(authority: TokenAuthority) -> None:
    signing_input = unsigned({"alg": "HS256", "typ": "JWT"}, payload())
    secret = authority.public_key_pem().encode()
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    exc = refused(authority, f"{signing_input}.{b64(mac)}")
    assert exc.code == "invalid_token"
    assert "EdDSA" in exc.message


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30.", "\x00\xff", None, 42, b"x.y.z"],
)
def test_garbage_is_refused(authority: TokenAuthority, garbage: Any) -> None:
    assert refused(authority, garbage).code == "invalid_token"


def test_oversized_token_is_refused_even_if_validly_signed(
    key: Ed25519PrivateKey, authority: TokenAuthority
) -> None:
    token = sign(key, payload(pad="x" * 4000))
    assert len(token) > 4096
    exc = refused(authority, token)
    assert exc.code == "invalid_token"
    assert "4096" in exc.message
    assert authority.verify(sign(key, payload(pad="x" * 100))).sub == "u-1"  # the pad is harmless


@pytest.mark.parametrize(
    "claim", ["iss", "aud", "sub", "name", "clinic", "tier", "room", "grants", "iat", "exp"]
)
def test_missing_claim_is_refused(
    key: Ed25519PrivateKey, authority: TokenAuthority, claim: str
) -> None:
    claims = payload()
    del claims[claim]
    assert refused(authority, sign(key, claims)).code == "invalid_token"


@pytest.mark.parametrize(
    "overrides",
    [
        {"tier": "provincial"},
        {"tier": 1},
        {"grants": ["join", "superuser"]},
        {"grants": "join"},
        {"grants": [1]},
        {"room": "room with spaces"},
        {"room": "x" * 129},
        {"sub": ""},
        {"sub": 7},
        {"name": ["a"]},
        {"clinic": "x" * 257},
        {"aud": "someone-else"},
        {"aud": ["konsilium", "other"]},
        {"iss": "evil"},
        {"exp": "tomorrow"},
    ],
    ids=repr,
)
def test_bad_claim_values_are_refused(
    key: Ed25519PrivateKey, authority: TokenAuthority, overrides: dict[str, Any]
) -> None:
    assert refused(authority, sign(key, payload(**overrides))).code == "invalid_token"


def test_token_for_another_room_is_refused(authority: TokenAuthority) -> None:
    exc = refused(authority, mint(authority, room="council-2"), room="council-1")
    assert exc.code == "wrong_room"


def test_missing_grant_is_forbidden(authority: TokenAuthority) -> None:
    token = mint(authority, grants=[Grant.JOIN, Grant.SUBSCRIBE])
    exc = refused(authority, token, room="council-1", require=Grant.PUBLISH)
    assert exc.code == "forbidden"
    assert "publish" in exc.message
    assert authority.verify(token, room="council-1", require=Grant.SUBSCRIBE).sub == "u-1"


def test_refusals_never_contain_the_token(
    key: Ed25519PrivateKey, authority: TokenAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    now = int(time.time())
    tokens = {
        "token_expired": sign(key, payload(sub="u-exp", iat=now - 900, exp=now - 60)),
        "invalid_token": mint(TokenAuthority(Ed25519PrivateKey.generate()), sub="u-forged"),
        "wrong_room": mint(authority, sub="u-room", room="other-room"),
        "forbidden": mint(authority, sub="u-grant", grants=[Grant.JOIN]),
    }
    caplog.set_level(logging.DEBUG)
    for code, token in tokens.items():
        exc = refused(authority, token, room="council-1", require=Grant.PUBLISH)
        assert exc.code == code
        for part in token.split("."):
            assert part not in str(exc)
            assert part not in repr(exc)
            assert part not in caplog.text
    auth_lines = [r.getMessage() for r in caplog.records if r.name == "signalling.auth"]
    assert len(auth_lines) == 4
    for code, sub in zip(
        tokens, ["u-exp", "u-forged", "u-room", "u-grant"], strict=True
    ):  # the code and the claimed identity are logged, for the audit trail
        assert any(code in line and sub in line for line in auth_lines)


def test_mint_refuses_what_verify_would_refuse(authority: TokenAuthority) -> None:
    with pytest.raises(ValueError):
        mint(authority, room="bad room")
    with pytest.raises(ValueError):
        mint(authority, grants=["join", "root"])
    with pytest.raises(ValueError):
        mint(authority, tier="galactic")
    with pytest.raises(ValueError):
        mint(authority, sub="")
    with pytest.raises(ValueError):
        mint(authority, ttl_s=0)


# -- key storage -------------------------------------------------------------------


def test_key_is_created_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = TokenAuthority.load_or_create(data_dir)
    key_file = data_dir / "keys" / "token_ed25519.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert [p.name for p in key_file.parent.iterdir()] == ["token_ed25519.pem"]  # no temp left

    second = TokenAuthority.load_or_create(data_dir)
    assert second.public_key_pem() == first.public_key_pem()
    assert second.verify(mint(first)).sub == "u-1"
    assert "PRIVATE KEY" not in first.public_key_pem()
    assert first.public_key_pem().startswith("-----BEGIN PUBLIC KEY-----")


def test_explicit_key_file_is_used(tmp_path: Path) -> None:
    key_file = tmp_path / "elsewhere" / "signing.pem"
    first = TokenAuthority.load_or_create(tmp_path / "data", key_file)
    assert key_file.exists()
    assert not (tmp_path / "data").exists()
    again = TokenAuthority.load_or_create(tmp_path / "other-data", key_file)
    assert again.public_key_pem() == first.public_key_pem()


def test_existing_directory_permissions_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o755)
    (tmp_path / "keys").chmod(0o755)
    TokenAuthority.load_or_create(tmp_path)
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o755


def test_unusable_key_files_are_reported(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(KeyFileError, match=r"garbage\.pem"):
        TokenAuthority.load_or_create(tmp_path, garbage)

    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        TokenAuthority.load_or_create(tmp_path, ec_key)
