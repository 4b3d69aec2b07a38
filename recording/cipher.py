"""The at-rest encryption format: chunked AES-256-GCM, for files and manifest entries.

One format for everything that is encrypted (segment files, composites,
playback copies, manifest entry data)::

    header   "KONSENC\\x01" | key id (8) | salt (16) | chunk size (4, big-endian)
    chunk 0  AES-256-GCM(plaintext[0:C])   + 16-byte tag
    chunk 1  AES-256-GCM(plaintext[C:2C])  + 16-byte tag
    …        the last chunk holds 0 < n <= C bytes (0 only for empty plaintext)

This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015) as
age and Tink's AES-GCM-HKDF streaming AEAD use it:

- each file gets its own key, HKDF-SHA256(configured key, salt): nonces never
  repeat across files, and no key approaches GCM's message limits;
- chunk ``i``'s nonce is ``i`` (11 bytes) and a last-chunk flag (1 byte), and
  every chunk authenticates the header (and a caller's ``context``): chunks
  cannot be reordered, dropped, moved between files, and a file cut at a chunk
  boundary fails (its new last chunk was not sealed as the last);
- a chunk can be decrypted alone: readers seek (HTTP Range, demuxers) and hold
  one chunk in memory, never the whole file.

``cryptography`` provides AES-GCM and HKDF; it has no streaming AEAD, so the
chunk framing (this module) is ours.  The key id in the header is public
(``recording.keyring``): it names the key a file needs.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from recording.errors import RecordingError
from recording.keyring import KEY_ID_BYTES, DataKey, Keyring, KeyUnavailable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

MAGIC = b"KONSENC\x01"
_HEADER = struct.Struct(">8s8s16sI")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 16
SALT_SIZE = 16
CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 1 << 24
HOLD_CHUNKS = 16  # EncryptingWriter keeps the first 1 MiB in memory until close
_HKDF_INFO = b"konsilium at-rest v1 file key"


class DecryptionError(RecordingError):
    """Encrypted data that does not decrypt: altered, truncated, or not this format."""


@dataclass(frozen=True, slots=True)
class Header:
    key_id: bytes
    salt: bytes
    chunk_size: int
    raw: bytes

    @property
    def key_hex(self) -> str:
        return self.key_id.hex()


def is_encrypted(prefix: bytes) -> bool:
    """Whether data starting with ``prefix`` is in this format (plain WebM starts with EBML)."""
    return prefix[: len(MAGIC)] == MAGIC


def parse_header(data: bytes, label: str = "data") -> Header:
    if len(data) < HEADER_SIZE or not is_encrypted(data):
        raise DecryptionError(f"{label}: not encrypted data of this format, or cut short")
    _magic, key_id, salt, chunk_size = _HEADER.unpack_from(data)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise DecryptionError(f"{label}: bad chunk size {chunk_size}")
    return Header(key_id, salt, chunk_size, bytes(data[:HEADER_SIZE]))


def new_header(key: DataKey, chunk_size: int = CHUNK_SIZE) -> Header:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} out of range")
    assert len(key.key_id) == KEY_ID_BYTES
    salt = os.urandom(SALT_SIZE)
    return Header(key.key_id, salt, chunk_size, _HEADER.pack(MAGIC, key.key_id, salt, chunk_size))


def _aead(key: DataKey, header: Header) -> AESGCM:
    file_key = HKDF(hashes.SHA256(), 32, header.salt, _HKDF_INFO).derive(key.secret)
    return AESGCM(file_key)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _key_for(header: Header, keyring: Keyring | None, label: str) -> DataKey:
    if keyring is None:
        raise KeyUnavailable(
            f"{label} is encrypted (key {header.key_hex}) and no recording key is configured "
            "(setting recording_key_file)",
            header.key_hex,
        )
    try:
        return keyring.get(header.key_id)
    except KeyUnavailable as exc:
        raise KeyUnavailable(f"{label}: {exc}", exc.key_id) from None


def _layout(stored_size: int, chunk_size: int, label: str) -> tuple[int, int]:
    """(chunks, plaintext size) of a stored file; DecryptionError when no file has that size."""
    body = stored_size - HEADER_SIZE
    chunks, rest = divmod(body, chunk_size + TAG_SIZE)
    if rest:
        if rest < TAG_SIZE or (chunks and rest == TAG_SIZE):
            raise DecryptionError(f"{label}: truncated ({stored_size} bytes)")
        chunks += 1
    if chunks == 0:
        raise DecryptionError(f"{label}: truncated ({stored_size} bytes)")
    return chunks, body - chunks * TAG_SIZE


# ---------------------------------------------------------------- whole buffers


def encrypt_bytes(
    plaintext: ReadableBuffer, key: DataKey, *, context: bytes = b"", chunk_size: int = CHUNK_SIZE
) -> bytes:
    """``plaintext`` in the at-rest format, sealed with a key derived from ``key``."""
    view = memoryview(plaintext).cast("B")
    header = new_header(key, chunk_size)
    aead = _aead(key, header)
    aad = header.raw + context
    count = max(1, -(-len(view) // chunk_size))
    parts = [header.raw]
    for i in range(count):
        piece = view[i * chunk_size : (i + 1) * chunk_size]
        parts.append(aead.encrypt(_nonce(i, i == count - 1), piece, aad))
    return b"".join(parts)


def decrypt_bytes(
    data: bytes, keyring: Keyring | None, *, context: bytes = b"", label: str = "data"
) -> bytes:
    """The plaintext of :func:`encrypt_bytes`'s output; KeyUnavailable or DecryptionError."""
    with DecryptingReader(io.BytesIO(data), keyring, context=context, label=label) as reader:
        return reader.read()


# ---------------------------------------------------------------- streams


class DecryptingReader(io.RawIOBase):
    """A seekable, read-only view of the plaintext of an encrypted file.

    Opening reads the header, finds the key and authenticates the last chunk
    (so :attr:`size` is true); reads decrypt one chunk at a time (one is cached).
    Closing closes ``raw``.
    """

    def __init__(
        self,
        raw: BinaryIO,
        keyring: Keyring | None,
        *,
        context: bytes = b"",
        label: str = "file",
    ) -> None:
        super().__init__()
        self._raw = raw
        self.label = label
        try:
            raw.seek(0)
            self.header = parse_header(raw.read(HEADER_SIZE), label)
            key = _key_for(self.header, keyring, label)
            stored = raw.seek(0, io.SEEK_END)
            self._chunks, self.size = _layout(stored, self.header.chunk_size, label)
            self._aead = _aead(key, self.header)
            self._aad = self.header.raw + context
            self._pos = 0
            self._cached: tuple[int, bytes] | None = None
            self._chunk(self._chunks - 1)
        except BaseException:
            raw.close()
            raise

    def _chunk(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        size = self.header.chunk_size
        self._raw.seek(HEADER_SIZE + index * (size + TAG_SIZE))
        sealed = self._raw.read(size + TAG_SIZE)
        final = index == self._chunks - 1
        try:
            plain = self._aead.decrypt(_nonce(index, final), sealed, self._aad)
        except InvalidTag:
            why = "altered, truncated or extended" if final else "altered"
            raise DecryptionError(
                f"{self.label}: chunk {index} does not authenticate ({why})"
            ) from None
        self._cached = (index, plain)
        return plain

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        out = memoryview(buffer).cast("B")
        if self._pos >= self.size or not len(out):
            return 0
        index, offset = divmod(self._pos, self.header.chunk_size)
        plain = self._chunk(index)
        n = min(len(out), len(plain) - offset)
        out[:n] = plain[offset : offset + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class EncryptingWriter(io.RawIOBase):
    """A seekable, write-only file object that stores what it is given encrypted.

    Muxers seek back to patch their header when they finish (WebM: duration,
    seek head, cues position).  The first ``hold_chunks`` chunks therefore stay
    in memory until :meth:`close`; later chunks are sealed and written as soon as
    data exists past them.  Writing into a chunk already written raises OSError
    (it would reuse its nonce).  :meth:`close` writes what is held and flushes
    ``raw`` (the caller fsyncs and closes it); :meth:`discard` drops it all.
    """

    def __init__(
        self,
        raw: BinaryIO,
        key: DataKey,
        *,
        context: bytes = b"",
        chunk_size: int = CHUNK_SIZE,
        hold_chunks: int = HOLD_CHUNKS,
    ) -> None:
        super().__init__()
        self._raw = raw
        self.header = new_header(key, chunk_size)
        self._aead = _aead(key, self.header)
        self._aad = self.header.raw + context
        self._size_c = chunk_size
        self._hold = max(1, hold_chunks)
        self._flushed_to = self._hold  # chunks [hold, flushed_to) are on disk
        self._pending: dict[int, bytearray] = {}
        self._pos = 0
        self._size = 0
        raw.seek(0)
        raw.write(self.header.raw)

    @property
    def size(self) -> int:
        """Plaintext bytes written so far."""
        return self._size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        if self.closed:
            raise ValueError("write to a closed EncryptingWriter")
        view = memoryview(data).cast("B")
        start, end, size = self._pos, self._pos + len(view), self._size_c
        for index in range(start // size, (end - 1) // size + 1 if end > start else 0):
            if self._hold <= index < self._flushed_to:
                raise OSError(errno.ESPIPE, "cannot rewrite encrypted data already written")
            chunk = self._pending.setdefault(index, bytearray())
            lo = max(start, index * size) - index * size
            hi = min(end, (index + 1) * size) - index * size
            if len(chunk) < lo:
                chunk.extend(bytes(lo - len(chunk)))
            chunk[lo:hi] = view[index * size + lo - start : index * size + hi - start]
        self._pos = end
        self._size = max(self._size, end)
        last = (self._size - 1) // size
        while self._flushed_to < last:  # a chunk with data after it is complete
            self._seal(self._flushed_to, final=False)
            self._flushed_to += 1
        return len(view)

    def _seal(self, index: int, *, final: bool) -> None:
        size = self._size_c
        length = self._size - index * size if final else size
        chunk = self._pending.pop(index, bytearray())
        chunk.extend(bytes(max(0, length - len(chunk))))
        sealed = self._aead.encrypt(_nonce(index, final), bytes(chunk[:length]), self._aad)
        self._raw.seek(HEADER_SIZE + index * (size + TAG_SIZE))
        self._raw.write(sealed)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        """Seal and write the held and last chunks, flush ``raw``; safe to call twice."""
        if self.closed:
            return
        try:
            last = max(0, (self._size - 1) // self._size_c)
            for index in range(last + 1):
                if not self._hold <= index < self._flushed_to:
                    self._seal(index, final=index == last)
            self._raw.flush()
        finally:
            self._pending.clear()
            super().close()

    def discard(self) -> None:
        """Close without writing anything more (the caller removes the file)."""
        self._pending.clear()
        self._hold = self._flushed_to = 0
        super().close()


# ---------------------------------------------------------------- manifest entries

ENCRYPTED_FIELD = "encrypted"


def entry_context(seq: int, entry_type: str) -> bytes:
    """What an entry's ciphertext is bound to: its place and type in the journal."""
    return f"manifest-entry:{seq}:{entry_type}".encode()


def seal_entry_data(
    data: Mapping[str, Any], key: DataKey, seq: int, entry_type: str
) -> dict[str, str]:
    """An entry's ``data`` as stored encrypted: ``{"encrypted": base64(at-rest format)}``."""
    plain = json.dumps(dict(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    sealed = encrypt_bytes(plain.encode("utf-8"), key, context=entry_context(seq, entry_type))
    return {ENCRYPTED_FIELD: base64.b64encode(sealed).decode("ascii")}


def is_sealed_entry_data(data: object) -> bool:
    return (
        isinstance(data, dict)
        and set(data) == {ENCRYPTED_FIELD}
        and isinstance(data[ENCRYPTED_FIELD], str)
    )


def entry_blob(data: Mapping[str, Any], label: str) -> bytes:
    try:
        return base64.b64decode(str(data[ENCRYPTED_FIELD]), validate=True)
    except (binascii.Error, ValueError, KeyError):
        raise DecryptionError(f"{label}: encrypted data is not base64") from None


def open_entry_data(
    data: Mapping[str, Any], keyring: Keyring | None, seq: int, entry_type: str
) -> dict[str, Any]:
    """The plaintext ``data`` of an entry sealed by :func:`seal_entry_data`."""
    label = f"manifest entry {seq}"
    blob = entry_blob(data, label)
    plain = decrypt_bytes(blob, keyring, context=entry_context(seq, entry_type), label=label)
    try:
        value = json.loads(plain)
    except ValueError:
        raise DecryptionError(f"{label}: decrypted data is not JSON") from None
    if not isinstance(value, dict):
        raise DecryptionError(f"{label}: decrypted data is not an object")
    return value
