"""Reading a recording back: the one place where stored files and entries are decrypted.

(And :class:`MediaOutput`, the one way media files derived from a recording —
composites, playback copies — are written: encrypted when a keyring is given.)

Every reader of recordings (composite render, FHIR export, render jobs,
retention, listings, the playback page, the CLI) goes through this module, so
an encrypted recording reads exactly like a plain one and a plain one reads as
it always did.  Whether a file is encrypted is told by its first bytes (the
format's magic, ``recording.cipher``), not by the configuration: recordings made
before a key was configured stay readable, and one made with a key says which
key it needs.

Errors: :class:`~recording.keyring.KeyUnavailable` (encrypted, and the key is
not configured — the message names the key id), and
:class:`~recording.cipher.DecryptionError` (does not authenticate: altered or
truncated).  Both are :class:`~recording.segments.RecordingError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from recording.cipher import (
    CHUNK_SIZE,
    HEADER_SIZE,
    DecryptingReader,
    DecryptionError,
    EncryptingWriter,
    decrypt_bytes,
    entry_blob,
    is_encrypted,
    is_sealed_entry_data,
    open_entry_data,
    parse_header,
)
from recording.errors import RecordingError
from recording.keyring import Keyring
from recording.manifest import MANIFEST_NAME
from recording.manifest import read_entries as read_stored_entries
from recording.segments import SegmentInfo

_READ_CHUNK = 1 << 20


# ---------------------------------------------------------------- files


def is_encrypted_file(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return is_encrypted(f.read(HEADER_SIZE))


def file_key_id(path: str | os.PathLike[str]) -> str | None:
    """The id of the key a file is encrypted with (readable without it); None if plain."""
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    return parse_header(head, str(path)).key_hex if is_encrypted(head) else None


def open_media(path: str | os.PathLike[str], keyring: Keyring | None) -> io.BufferedReader:
    """A seekable binary file of the plaintext: the file itself, or a decrypting view of it.

    Give it to ``av.open`` or read it; close it (it is a context manager).
    """
    raw = open(path, "rb")  # returned to the caller, or closed by the reader
    try:
        encrypted = is_encrypted(raw.read(HEADER_SIZE))
        raw.seek(0)
    except BaseException:
        raw.close()
        raise
    if not encrypted:
        return raw
    reader = DecryptingReader(raw, keyring, label=Path(path).name)
    return io.BufferedReader(reader, buffer_size=CHUNK_SIZE)


def read_media(path: str | os.PathLike[str], keyring: Keyring | None) -> bytes:
    with open_media(path, keyring) as f:
        return f.read()


def media_size(path: str | os.PathLike[str], keyring: Keyring | None) -> int:
    """Plaintext size (the file's size when it is not encrypted)."""
    with open_media(path, keyring) as f:
        return f.seek(0, os.SEEK_END)


def media_digest(
    path: str | os.PathLike[str], keyring: Keyring | None, algorithm: str = "sha256"
) -> tuple[int, bytes]:
    """(size, digest) of the plaintext: what a reader of the decrypted file receives."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm not in ("sha1", "md5"))
    size = 0
    with open_media(path, keyring) as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.digest()


def read_range(
    path: str | os.PathLike[str], keyring: Keyring | None, start: int, length: int
) -> bytes:
    """``length`` plaintext bytes from ``start`` (fewer at the end of the file)."""
    with open_media(path, keyring) as f:
        f.seek(start)
        return f.read(length)


class SegmentAltered(RecordingError):
    """A segment file does not match the SHA-256 its manifest entry lists."""


def read_segment(root: str | os.PathLike[str], info: SegmentInfo, keyring: Keyring | None) -> bytes:
    """One listed segment's plaintext, after checking the stored bytes against its SHA-256.

    SegmentAltered (or OSError) when the file is not what the manifest lists.
    """
    path = Path(root) / info.path
    stored = path.read_bytes()
    if hashlib.sha256(stored).hexdigest() != info.sha256:
        raise SegmentAltered(f"{info.path} does not match its SHA-256 in the manifest")
    if not is_encrypted(stored[:HEADER_SIZE]):
        return stored
    return decrypt_bytes(stored, keyring, label=info.path)


class MediaOutput:
    """Where a muxer writes a derived media file: ``path`` itself, or, with a keyring,
    an encrypting file object over it (nothing in the clear reaches the disk).

    ``av.open(output.target, "w", format=…)``; then :meth:`finish` (seal, fsync,
    close) or, on failure, :meth:`discard` (the caller removes the file).
    """

    def __init__(self, path: Path, keyring: Keyring | None) -> None:
        self._raw: BinaryIO | None = None
        self._writer: EncryptingWriter | None = None
        self.target: str | EncryptingWriter = str(path)
        if keyring is not None:
            self._raw = open(path, "wb")  # closed by finish() or discard()
            self._writer = EncryptingWriter(self._raw, keyring.active)
            self.target = self._writer

    def finish(self) -> None:
        if self._writer is not None and self._raw is not None:
            self._writer.close()
            os.fsync(self._raw.fileno())
            self._raw.close()

    def discard(self) -> None:
        if self._writer is not None and self._raw is not None:
            self._writer.discard()
            self._raw.close()


# ---------------------------------------------------------------- manifest


def entry_data(entry: dict[str, Any], keyring: Keyring | None) -> dict[str, Any]:
    """The plaintext ``data`` of one stored manifest entry."""
    data = entry.get("data")
    if is_sealed_entry_data(data):
        assert isinstance(data, dict)
        return open_entry_data(data, keyring, int(entry["seq"]), str(entry["type"]))
    return data if isinstance(data, dict) else {}


def read_entries(
    directory: str | os.PathLike[str], keyring: Keyring | None
) -> list[dict[str, Any]]:
    """The manifest's complete entries with their ``data`` decrypted (unchecked: see verify)."""
    entries = read_stored_entries(directory)
    return [{**entry, "data": entry_data(entry, keyring)} for entry in entries]


def read_first_entry(
    directory: str | os.PathLike[str], keyring: Keyring | None
) -> dict[str, Any] | None:
    """The first manifest entry (``recording_started``) decrypted, reading only its line."""
    with open(Path(directory) / MANIFEST_NAME, "rb") as f:
        line = f.readline()
    if not line.endswith(b"\n"):
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        raise DecryptionError("the first manifest entry is not JSON") from None
    if not isinstance(entry, dict):
        return None
    return {**entry, "data": entry_data(entry, keyring)}


def is_encrypted_recording(directory: str | os.PathLike[str]) -> bool:
    """Whether the recording's journal is encrypted (reads its first line only)."""
    with open(Path(directory) / MANIFEST_NAME, "rb") as f:
        try:
            first = json.loads(f.readline())
        except ValueError:
            return False
    return isinstance(first, dict) and is_sealed_entry_data(first.get("data"))


def entry_key_id(entry: dict[str, Any]) -> str | None:
    """The key id of an encrypted entry (readable without the key); None if plain."""
    data = entry.get("data")
    if not is_sealed_entry_data(data):
        return None
    assert isinstance(data, dict)
    return parse_header(entry_blob(data, "entry"), "entry").key_hex
