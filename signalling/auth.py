"""Access tokens: Ed25519-signed JWTs that say who may do what in which room.

The server holds one Ed25519 key (``<data_dir>/keys/token_ed25519.pem`` unless
configured otherwise), mints tokens with it (``konsilium token``,
``POST /api/tokens``) and verifies them on ``join``. Only ``EdDSA`` is
accepted, so ``alg: none`` and HMAC tokens "signed" with the public key are
refused before any signature check.

A token is a credential: it never appears in a log line or an error message.
Refusals are logged with their code and, when the payload can be read without
trusting it, the claimed ``sub`` and ``room``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

AUDIENCE = "konsilium"
DEFAULT_ISSUER = "konsilium"
LEEWAY_S = 5
MAX_TOKEN_CHARS = 4096
MAX_TEXT_CLAIM = 256
ROOM_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
DEFAULT_KEY_PATH = Path("keys") / "token_ed25519.pem"

_REQUIRED_CLAIMS = ["iss", "aud", "sub", "name", "clinic", "tier", "room", "grants", "iat", "exp"]


class Grant(StrEnum):
    JOIN = "join"
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    CHAIR = "chair"
    RECORD = "record"
    VIEW_RECORDINGS = "view_recordings"
    INGEST = "ingest"


class Tier(StrEnum):
    DISTRICT = "district"
    REGIONAL = "regional"
    FEDERAL = "federal"


@dataclass(frozen=True)
class Claims:
    """The verified content of a token."""

    sub: str
    name: str
    clinic: str
    tier: Tier
    room: str
    grants: frozenset[Grant]
    exp: int
    iat: int
    nbf: int | None = None
    jti: str = ""

    def has(self, grant: Grant) -> bool:
        return grant in self.grants

    @property
    def role(self) -> str:
        """``chair``, ``observer`` (cannot publish) or ``consultant``."""
        if Grant.CHAIR in self.grants:
            return "chair"
        if Grant.PUBLISH not in self.grants:
            return "observer"
        return "consultant"


class AuthError(Exception):
    """A refused token. ``code`` is one of the protocol's error codes."""

    CODES = frozenset(
        {"invalid_token", "token_expired", "token_not_yet_valid", "wrong_room", "forbidden"}
    )

    def __init__(self, code: str, message: str) -> None:
        if code not in self.CODES:
            raise ValueError(f"unknown auth error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"AuthError({self.code!r}, {self.message!r})"


class KeyFileError(Exception):
    """The token key file cannot be read, or holds something other than an Ed25519 key."""


class TokenAuthority:
    """Mints and verifies room tokens with one Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey, issuer: str = DEFAULT_ISSUER) -> None:
        self._private_key = private_key
        self._public_key: Ed25519PublicKey = private_key.public_key()
        self.issuer = issuer

    def __repr__(self) -> str:
        return f"<TokenAuthority issuer={self.issuer!r}>"

    # -- key storage ---------------------------------------------------------

    @classmethod
    def load_or_create(cls, data_dir: Path, key_file: Path | None = None) -> TokenAuthority:
        """Load the key from ``key_file`` (default ``data_dir/keys/token_ed25519.pem``).

        On first use the key is generated and written with mode 0600; a parent
        directory created here gets mode 0700. Several processes starting at
        once end up with the same key: the file appears atomically, and a
        process that loses the race reads the winner's key.
        """
        path = cls.key_path(data_dir, key_file)
        if path.exists():
            return cls(_read_key(path))
        _make_private_dir(path.parent)
        key = Ed25519PrivateKey.generate()
        if _write_new_key(path, key):
            log.info("created token signing key %s", path)
            return cls(key)
        return cls(_read_key(path))

    @staticmethod
    def key_path(data_dir: Path, key_file: Path | None = None) -> Path:
        """Where :meth:`load_or_create` keeps the key."""
        return key_file if key_file is not None else data_dir / DEFAULT_KEY_PATH

    def public_key_pem(self) -> str:
        return self._public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    # -- minting -------------------------------------------------------------

    def mint(
        self,
        *,
        sub: str,
        name: str,
        clinic: str,
        tier: Tier | str,
        room: str,
        grants: Iterable[Grant | str],
        ttl_s: int,
        not_before: int | None = None,
    ) -> str:
        """Return a signed token; see :meth:`issue` for the rules."""
        token, _claims = self.issue(
            sub=sub,
            name=name,
            clinic=clinic,
            tier=tier,
            room=room,
            grants=grants,
            ttl_s=ttl_s,
            not_before=not_before,
        )
        return token

    def issue(
        self,
        *,
        sub: str,
        name: str,
        clinic: str,
        tier: Tier | str,
        room: str,
        grants: Iterable[Grant | str],
        ttl_s: int,
        not_before: int | None = None,
    ) -> tuple[str, Claims]:
        """Return a signed token and the claims it carries.

        Raises ``ValueError`` for input that :meth:`verify` would refuse
        (unknown tier or grant, bad room name, empty ``sub``, non-positive ttl).
        """
        now = int(time.time())
        claims = Claims(
            sub=_text("sub", sub, allow_empty=False),
            name=_text("name", name),
            clinic=_text("clinic", clinic),
            tier=Tier(tier),
            room=_room(room),
            grants=frozenset(Grant(g) for g in grants),
            iat=now,
            exp=now + _positive("ttl_s", ttl_s),
            nbf=not_before,
            jti=secrets.token_urlsafe(16),
        )
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": claims.sub,
            "name": claims.name,
            "clinic": claims.clinic,
            "tier": claims.tier.value,
            "room": claims.room,
            "grants": sorted(g.value for g in claims.grants),
            "iat": claims.iat,
            "exp": claims.exp,
            "jti": claims.jti,
        }
        if not_before is not None:
            payload["nbf"] = int(not_before)
        token = jwt.encode(payload, self._private_key, algorithm="EdDSA")
        return token, claims

    # -- verifying -----------------------------------------------------------

    def verify(
        self, token: str, *, room: str | None = None, require: Grant | None = None
    ) -> Claims:
        """Check signature, issuer, audience, times, room and grant; return the claims.

        Raises :class:`AuthError` with the protocol's code on any refusal.
        """
        try:
            claims = self._verify(token, room=room, require=require)
        except AuthError as exc:
            sub, claimed_room = _peek(token)
            log.info(
                "token refused: code=%s sub=%s room=%s wanted_room=%s",
                exc.code,
                sub,
                claimed_room,
                room,
            )
            raise
        return claims

    def _verify(self, token: str, *, room: str | None, require: Grant | None) -> Claims:
        if not isinstance(token, str) or not token:
            raise AuthError("invalid_token", "the token is missing")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("invalid_token", f"the token is longer than {MAX_TOKEN_CHARS} chars")
        try:
            payload = jwt.decode(
                token,
                self._public_key,
                algorithms=["EdDSA"],
                audience=AUDIENCE,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": _REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token_not_yet_valid", "the token is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("invalid_token", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("invalid_token", "the token is not signed with EdDSA") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid_token", "the token signature is not valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("invalid_token", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("invalid_token", "the token is from another issuer") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise AuthError("invalid_token", "the token is malformed") from None
        claims = _claims_from_payload(payload)
        if room is not None and claims.room != room:
            raise AuthError("wrong_room", "the token is for another room")
        if require is not None and require not in claims.grants:
            raise AuthError("forbidden", f"the token does not grant {require.value!r}")
        return claims


# -- helpers -------------------------------------------------------------------


def _claims_from_payload(payload: Mapping[str, Any]) -> Claims:
    try:
        return Claims(
            sub=_text("sub", payload["sub"], allow_empty=False),
            name=_text("name", payload["name"]),
            clinic=_text("clinic", payload["clinic"]),
            tier=_tier(payload["tier"]),
            room=_room(payload["room"]),
            grants=_grants(payload["grants"]),
            exp=_timestamp("exp", payload["exp"]),
            iat=_timestamp("iat", payload["iat"]),
            nbf=None if payload.get("nbf") is None else _timestamp("nbf", payload["nbf"]),
            jti=_text("jti", payload.get("jti", "")),
        )
    except ValueError as exc:
        raise AuthError("invalid_token", f"the token has a bad claim: {exc}") from None


def _text(field: str, value: object, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    if not allow_empty and not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_TEXT_CLAIM:
        raise ValueError(f"{field} is longer than {MAX_TEXT_CLAIM} chars")
    return value


def _room(value: object) -> str:
    if not isinstance(value, str) or not ROOM_ID_RE.fullmatch(value):
        raise ValueError("room must be 1-128 chars of A-Z a-z 0-9 _ . -")
    return value


def _tier(value: object) -> Tier:
    if not isinstance(value, str) or value not in {t.value for t in Tier}:
        raise ValueError("tier is not one of " + ", ".join(t.value for t in Tier))
    return Tier(value)


def _grants(value: object) -> frozenset[Grant]:
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise ValueError("grants must be a list of strings")
    known = {g.value for g in Grant}
    unknown = [g for g in value if g not in known]
    if unknown:
        raise ValueError("unknown grant(s) " + ", ".join(repr(g[:32]) for g in unknown[:4]))
    return frozenset(Grant(g) for g in value)


def _timestamp(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must be a number")
    return int(value)


def _positive(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive integer")
    return value


def _peek(token: object) -> tuple[str, str]:
    """The claimed ``sub`` and ``room`` for a log line, read without trusting the token."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        return "-", "-"
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except (jwt.InvalidTokenError, ValueError, TypeError):
        return "-", "-"
    if not isinstance(payload, dict):
        return "-", "-"
    return _printable(payload.get("sub")), _printable(payload.get("room"))


def _printable(value: object) -> str:
    if not isinstance(value, str):
        return "-"
    return repr(value[:64])


def _read_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read token key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"token key {path} is not a readable PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"token key {path} is not an Ed25519 key")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("token key %s is readable by others (mode %o); chmod 600 it", path, mode)
    return key


def _make_private_dir(directory: Path) -> None:
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    # Only directories created here are tightened: an existing one belongs to the operator.
    for created in missing:
        os.chmod(created, 0o700)


def _write_new_key(path: Path, key: Ed25519PrivateKey) -> bool:
    """Write ``key`` to ``path`` unless it exists; True if this call created it."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # atomic, and fails if another process got there first
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            return _write_exclusive(path, pem)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _write_exclusive(path: Path, pem: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return True
