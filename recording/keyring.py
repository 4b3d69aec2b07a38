"""Recording encryption keys: the configured AES-256 keys, by key id.

A key file (setting ``recording_key_file``) holds one or more 32-byte keys:

- a text file with one key a line, base64 of the 32 bytes (``openssl rand
  -base64 32`` makes one; ``konsilium recordings new-key`` appends one);
  blank lines and lines starting with ``#`` are ignored;
- or exactly 32 raw bytes (``head -c 32 /dev/urandom``): one key.

The **last** key of the file encrypts what is written from now on; every key in
the file can decrypt.  Rotation: append a new key and restart; keep the old
lines for as long as recordings made with them are kept.  A key's id is derived
from the key itself (16 hex digits), is written in the clear in front of every
encrypted file and manifest entry, and says which key a recording needs.

The file must not be readable by group or others (mode 0600 or 0400).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from recording.errors import RecordingError

KEY_BYTES = 32
KEY_ID_BYTES = 8
_KEY_ID_CONTEXT = b"konsilium-recording-key-id\x00"


class EncryptionKeyError(RecordingError):
    """The key file is missing, unreadable, exposed or does not hold keys."""


class KeyUnavailable(RecordingError):
    """A recording is encrypted with a key that is not configured here."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


def key_id_of(secret: bytes) -> bytes:
    """The 8-byte id of a key: a hash of it under a fixed context (reveals nothing usable)."""
    return hashlib.sha256(_KEY_ID_CONTEXT + secret).digest()[:KEY_ID_BYTES]


@dataclass(frozen=True, slots=True)
class DataKey:
    """One AES-256 key and its id; ``repr`` never shows the key."""

    secret: bytes = field(repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ValueError(f"a recording key is {KEY_BYTES} bytes, not {len(self.secret)}")
        object.__setattr__(self, "key_id", key_id_of(self.secret))

    @property
    def id(self) -> str:
        return self.key_id.hex()


class Keyring:
    """The configured keys: the active one encrypts, all of them decrypt."""

    def __init__(self, keys: Iterable[DataKey], *, source: str = "") -> None:
        unique: dict[bytes, DataKey] = {}
        for key in keys:
            unique.pop(key.key_id, None)  # a repeated key counts where it was last listed
            unique[key.key_id] = key
        if not unique:
            raise EncryptionKeyError(f"{source or 'keyring'}: no key")
        self._keys = unique
        self.active: DataKey = list(unique.values())[-1]
        self.source = source

    def __repr__(self) -> str:
        return f"Keyring(active={self.active.id}, keys={len(self._keys)}, source={self.source!r})"

    @property
    def ids(self) -> list[str]:
        return [k.id for k in self._keys.values()]

    def get(self, key_id: bytes) -> DataKey:
        """The key with this id; :class:`KeyUnavailable` naming it when it is not configured."""
        key = self._keys.get(key_id)
        if key is None:
            raise KeyUnavailable(
                f"encrypted with key {key_id.hex()}, which is not in {self.source or 'the keyring'}"
                f" (it has {', '.join(self.ids)})",
                key_id.hex(),
            )
        return key

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a key file (see the module docstring); EncryptionKeyError says what is wrong."""
        file = Path(path)
        try:
            mode = file.stat().st_mode & 0o777
            data = file.read_bytes()
        except OSError as exc:
            raise EncryptionKeyError(f"recording key file {file}: {exc.strerror}") from None
        if mode & 0o077:
            raise EncryptionKeyError(
                f"recording key file {file} is accessible to others (mode {mode:o}); chmod 600"
            )
        return cls(parse_key_file(data, str(file)), source=str(file))


def parse_key_file(data: bytes, label: str) -> list[DataKey]:
    """The keys of a key file's content, in file order.  Errors never echo key material."""
    if len(data) == KEY_BYTES:
        return [DataKey(data)]
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise EncryptionKeyError(
            f"recording key file {label}: neither {KEY_BYTES} raw bytes nor base64 lines"
        ) from None
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            secret = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            secret = b""
        if len(secret) != KEY_BYTES:
            raise EncryptionKeyError(
                f"recording key file {label}: line {lineno} is not base64 of {KEY_BYTES} bytes"
            )
        keys.append(DataKey(secret))
    if not keys:
        raise EncryptionKeyError(f"recording key file {label}: no key in it")
    return keys


def new_key_line() -> tuple[str, str]:
    """A fresh random key as a key-file line, and its id."""
    key = DataKey(secrets.token_bytes(KEY_BYTES))
    return base64.b64encode(key.secret).decode("ascii"), key.id


def append_new_key(path: str | os.PathLike[str]) -> str:
    """Append a fresh key to ``path`` (created 0600 if missing); return its id.

    The new key becomes the active one at the next start; the file's other keys
    still decrypt what they encrypted.
    """
    file = Path(path)
    line, key_id = new_key_line()
    existing = b""
    if file.exists():
        Keyring.load(file)  # refuse to append to a file that is not a valid key file
        existing = file.read_bytes()
        if len(existing) == KEY_BYTES:
            raise EncryptionKeyError(
                f"recording key file {file} holds one raw key; convert it to base64 lines first"
            )
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        prefix = b"\n" if existing and not existing.endswith(b"\n") else b""
        os.write(fd, prefix + line.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key_id
