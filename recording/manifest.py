"""Manifest: the append-only, hash-chained journal of one recording.

``manifest.jsonl`` holds one JSON object a line::

    {"seq": 0, "at": "2025-09-01T10:00:00.000Z", "type": "recording_started",
     "data": {...}, "prev": "000…0", "hash": "…"}

``hash`` is the SHA-256 (hex) of the canonical JSON (sorted keys, no spaces,
UTF-8) of the entry without ``hash``; ``prev`` is the previous entry's hash (64
zeros for the first).  Every line is written with one ``write`` and fsync'ed
before :meth:`Manifest.append` returns, so a crash loses at most the entry being
written (a torn last line).  :meth:`Manifest.seal` appends a ``sealed`` entry
with an Ed25519 signature over the chain head, which covers every entry and,
through ``segment`` entries, every segment file's SHA-256.

Appends are thread-safe (TrackWriter reports segments from its worker thread).

Encryption at rest: given a ``key``, every entry's ``data`` is stored encrypted
(``{"encrypted": …}``, see ``recording.cipher``) except for ``segment`` and
``sealed`` entries, which carry no personal data and are what ``verify``
checks.  ``seq``, ``at``, ``type``, ``prev`` and ``hash`` stay in the clear and
the chain hashes the entry *as stored*: the chain, the seal and every segment's
SHA-256 verify without the key; the key is needed to read names, clinics,
patient and room.  :func:`read_entries` returns entries as stored; readers use
``recording.storage.read_entries``, which decrypts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from recording.cipher import seal_entry_data
from recording.keyring import DataKey
from recording.segments import RecordingError, SegmentInfo

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
GENESIS_HASH = "0" * 64
SEAL_CONTEXT = b"konsilium-recording-seal-v1"
ENTRY_TYPES = frozenset(
    {
        "recording_started",
        "participant",
        "consent",
        "track_started",
        "segment",
        "track_ended",
        "event",
        "recording_stopped",
        "sealed",
    }
)
CLEAR_ENTRY_TYPES = frozenset({"segment", "sealed"})  # never encrypted: verify reads them
ENTRY_KEYS = frozenset({"seq", "at", "type", "data", "prev", "hash"})
_EVENT_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
KEY_DIR = "keys"
KEY_FILE = "recording_ed25519.pem"


class ManifestError(RecordingError):
    """The manifest cannot be read or written as asked."""


class ManifestSealedError(ManifestError):
    """Nothing may be appended after the seal."""


class RecordingKeyError(RecordingError):
    """The recording signing key is missing, unreadable or exposed."""


# ---------------------------------------------------------------- primitives


def canonical_json(obj: Any) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of ``entry`` without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def iso_utc(moment: datetime) -> str:
    """``2025-09-01T10:00:00.123Z``; naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def seal_message(signed_hash: str, fingerprint: str) -> bytes:
    """What the seal signs: a context string, the chain head and the key fingerprint."""
    return SEAL_CONTEXT + b"\n" + signed_hash.encode("ascii") + b"\n" + fingerprint.encode("ascii")


# ---------------------------------------------------------------- keys


class RecordingKeys:
    """The server's Ed25519 recording key, PEM (PKCS#8) in ``data_dir/keys`` (0600)."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path) -> None:
        self.private_key = private_key
        self.path = path

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> RecordingKeys:
        key_dir = Path(data_dir) / KEY_DIR
        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = key_dir / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls._load(path)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("created recording key %s", key_fingerprint(key.public_key()))
        return cls(key, path)

    @classmethod
    def _load(cls, path: Path) -> RecordingKeys:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise RecordingKeyError(f"{path} is accessible to others (mode {mode:o}); chmod 600")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise RecordingKeyError(f"{path} is not a PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise RecordingKeyError(f"{path} is not an Ed25519 key")
        return cls(key, path)

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_key_pem(self) -> str:
        return (
            self.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key())


def load_public_key_pem(pem: str | bytes) -> Ed25519PublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise RecordingKeyError("not an Ed25519 public key")
    return key


# ---------------------------------------------------------------- journal


class Manifest:
    """Append-only journal of one recording directory (created if missing).

    With a ``key``, entry data is stored encrypted (see the module docstring).
    Opening an existing manifest continues its chain.  A torn last line (crash
    while writing) is cut off and recorded as an ``event`` of kind ``recovered``
    with the length and SHA-256 of the fragment, so the cut is itself on record.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        clock: Callable[[], datetime] | None = None,
        key: DataKey | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.key = key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / MANIFEST_NAME
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._next_seq = 0
        self._last_hash = GENESIS_HASH
        self._sealed = False
        torn = self._load_tail()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if torn is not None:
            self.event("recovered", {"torn_bytes": len(torn), "torn_sha256": _sha256(torn)})

    # ------------------------------------------------------------ state

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_hash(self) -> str:
        return self._last_hash

    @property
    def sealed(self) -> bool:
        return self._sealed

    def _load_tail(self) -> bytes | None:
        """Continue an existing chain; cut a torn last line and return it."""
        if not self.path.exists():
            return None
        raw = self.path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        lines = raw[:cut].splitlines()
        if lines:
            try:
                last = json.loads(lines[-1])
                seq, last_hash, kind = int(last["seq"]), str(last["hash"]), str(last["type"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ManifestError(f"{self.path}: last entry is unreadable") from exc
            if entry_hash(last) != last_hash:
                raise ManifestError(f"{self.path}: last entry does not match its hash")
            self._next_seq, self._last_hash, self._sealed = seq + 1, last_hash, kind == "sealed"
        torn = raw[cut:] or None
        if torn is not None:
            if self._sealed:
                raise ManifestSealedError(f"{self.path}: bytes after the seal")
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
            log.warning("%s: cut a torn last line of %d bytes", self.directory.name, len(torn))
        return torn

    # ------------------------------------------------------------ append

    def append(
        self, entry_type: str, data: Mapping[str, Any], *, at: datetime | None = None
    ) -> dict[str, Any]:
        """Append one entry, fsync it, return it as stored (with ``seq``, ``prev``, ``hash``)."""
        if entry_type not in ENTRY_TYPES:
            raise ValueError(f"unknown manifest entry type {entry_type!r}")
        with self._lock:
            if self._fd is None:
                raise ManifestError("manifest is closed")
            if self._sealed:
                raise ManifestSealedError(f"{self.directory.name}: manifest is sealed")
            stored: dict[str, Any] = dict(data)
            if self.key is not None and entry_type not in CLEAR_ENTRY_TYPES:
                stored = seal_entry_data(stored, self.key, self._next_seq, entry_type)
            entry: dict[str, Any] = {
                "seq": self._next_seq,
                "at": iso_utc(at or self._clock()),
                "type": entry_type,
                "data": stored,
                "prev": self._last_hash,
            }
            entry["hash"] = entry_hash(entry)
            _write_all(self._fd, canonical_json(entry) + b"\n")
            os.fsync(self._fd)
            self._next_seq += 1
            self._last_hash = entry["hash"]
            self._sealed = entry_type == "sealed"
            return entry

    async def append_async(
        self, entry_type: str, data: Mapping[str, Any], *, at: datetime | None = None
    ) -> dict[str, Any]:
        """:meth:`append` on a worker thread, for callers on the event loop."""
        return await asyncio.to_thread(self.append, entry_type, data, at=at)

    def recording_started(
        self,
        *,
        recording_id: str,
        room: str,
        consultation_id: str,
        patient_ref: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "recording_id": recording_id,
            "room": room,
            "consultation_id": consultation_id,
            "settings": dict(settings or {}),
        }
        if patient_ref is not None:
            data["patient_ref"] = patient_ref
        return self.append("recording_started", data)

    def participant(
        self, participant_id: str, *, name: str, clinic: str, tier: str, role: str
    ) -> dict[str, Any]:
        return self.append(
            "participant",
            {"id": participant_id, "name": name, "clinic": clinic, "tier": tier, "role": role},
        )

    def consent(
        self, participant_id: str, *, granted: bool, at: datetime | None = None
    ) -> dict[str, Any]:
        moment = iso_utc(at or self._clock())
        return self.append(
            "consent", {"participant_id": participant_id, "granted": granted, "at": moment}
        )

    def track_started(
        self,
        track_id: str,
        *,
        participant_id: str,
        kind: str,
        source: str,
        codec: str,
        offset_s: float,
    ) -> dict[str, Any]:
        return self.append(
            "track_started",
            {
                "track_id": track_id,
                "participant_id": participant_id,
                "kind": kind,
                "source": source,
                "codec": codec,
                "offset_s": offset_s,
            },
        )

    def segment(self, info: SegmentInfo) -> dict[str, Any]:
        return self.append("segment", info.to_dict())

    def track_ended(
        self, track_id: str, *, stats: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return self.append("track_ended", {"track_id": track_id, "stats": dict(stats or {})})

    def event(
        self,
        kind: str,
        data: Mapping[str, Any] | None = None,
        *,
        participant_id: str | None = None,
    ) -> dict[str, Any]:
        """join, leave, mute, unmute, chat, document, conclusion, … (lowercase word)."""
        if not _EVENT_KIND_RE.match(kind):
            raise ValueError(f"event kind {kind!r} is not a lowercase word")
        body: dict[str, Any] = {"kind": kind, **dict(data or {})}
        if participant_id is not None:
            body["participant_id"] = participant_id
        return self.append("event", body)

    def recording_stopped(self, *, reason: str = "stopped") -> dict[str, Any]:
        return self.append("recording_stopped", {"reason": reason})

    def seal(self, private_key: Ed25519PrivateKey) -> dict[str, Any]:
        """Append the final ``sealed`` entry: Ed25519 over the chain head and key fingerprint."""
        fingerprint = key_fingerprint(private_key.public_key())
        with self._lock:
            signed_hash = self._last_hash
            signed_seq = self._next_seq - 1
        if signed_seq < 0:
            raise ManifestError("nothing to seal")
        signature = private_key.sign(seal_message(signed_hash, fingerprint))
        return self.append(
            "sealed",
            {
                "algorithm": "Ed25519",
                "signed_seq": signed_seq,
                "signed_hash": signed_hash,
                "key_fingerprint": fingerprint,
                "signature": base64.b64encode(signature).decode("ascii"),
            },
        )

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the file; safe to call twice."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_entries(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The parsed complete lines of a manifest, as stored, without any checking.

    verify.py checks them; for an encrypted recording most ``data`` is ciphertext:
    ``recording.storage.read_entries`` decrypts.
    """
    raw = (Path(directory) / MANIFEST_NAME).read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
