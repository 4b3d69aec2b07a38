"""At-rest encryption: the chunked AES-256-GCM format, the keyring and its key file."""

from __future__ import annotations

import base64
import io
import os
import secrets
from pathlib import Path

import av
import pytest

from recording.cipher import (
    CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    DecryptingReader,
    DecryptionError,
    EncryptingWriter,
    decrypt_bytes,
    encrypt_bytes,
    open_entry_data,
    seal_entry_data,
)
from recording.keyring import (
    DataKey,
    EncryptionKeyError,
    Keyring,
    KeyUnavailable,
    append_new_key,
    new_key_line,
)

SMALL = 1024  # chunk size for the framing tests: many chunks from little data


def new_key() -> DataKey:
    return DataKey(secrets.token_bytes(32))


@pytest.fixture
def key() -> DataKey:
    return new_key()


@pytest.fixture
def ring(key: DataKey) -> Keyring:
    return Keyring([key])


# ---------------------------------------------------------------- whole buffers


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, SMALL + 1, 5 * SMALL, 5 * SMALL + 7])
def test_round_trip_at_every_chunk_boundary(key: DataKey, ring: Keyring, size: int) -> None:
    plain = os.urandom(size)
    sealed = encrypt_bytes(plain, key, chunk_size=SMALL)
    assert sealed.startswith(MAGIC) and sealed[8:16] == key.key_id
    chunks = max(1, -(-size // SMALL))
    assert len(sealed) == HEADER_SIZE + size + chunks * TAG_SIZE
    assert decrypt_bytes(sealed, ring) == plain
    assert size < 16 or plain[:16] not in sealed


def test_same_plaintext_twice_gives_different_ciphertext(key: DataKey) -> None:
    assert encrypt_bytes(b"webm" * 100, key) != encrypt_bytes(b"webm" * 100, key)


def test_wrong_key_is_named_and_no_key_says_to_configure_one(key: DataKey) -> None:
    sealed = encrypt_bytes(b"secret", key)
    other = Keyring([new_key()], source="/etc/konsilium/keys")
    with pytest.raises(KeyUnavailable) as wrong:
        decrypt_bytes(sealed, other)
    assert wrong.value.key_id == key.id
    assert key.id in str(wrong.value) and "/etc/konsilium/keys" in str(wrong.value)
    with pytest.raises(KeyUnavailable, match="recording_key_file"):
        decrypt_bytes(sealed, None)


def test_tampered_ciphertext_header_or_context_does_not_decrypt(
    key: DataKey, ring: Keyring
) -> None:
    sealed = encrypt_bytes(os.urandom(3 * SMALL), key, chunk_size=SMALL, context=b"a")
    for pos in (HEADER_SIZE + 5, HEADER_SIZE + SMALL + TAG_SIZE + 1, len(sealed) - 1, 20):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(DecryptionError):
            decrypt_bytes(bytes(bad), ring, context=b"a")
    with pytest.raises(DecryptionError):
        decrypt_bytes(sealed, ring, context=b"b")


def test_truncated_or_reordered_files_do_not_decrypt(key: DataKey, ring: Keyring) -> None:
    sealed = encrypt_bytes(os.urandom(3 * SMALL), key, chunk_size=SMALL)
    step = SMALL + TAG_SIZE
    for cut in (HEADER_SIZE + 2 * step, HEADER_SIZE + step, len(sealed) - 1, HEADER_SIZE + 3, 10):
        with pytest.raises(DecryptionError):
            decrypt_bytes(sealed[:cut], ring)
    body = sealed[HEADER_SIZE:]
    swapped = sealed[:HEADER_SIZE] + body[step : 2 * step] + body[:step] + body[2 * step :]
    with pytest.raises(DecryptionError):
        decrypt_bytes(swapped, ring)
    with pytest.raises(DecryptionError, match="not encrypted"):
        decrypt_bytes(b"\x1aE\xdf\xa3 plain webm", ring)


# ---------------------------------------------------------------- streams


def test_reader_seeks_and_reads_any_range(key: DataKey, ring: Keyring) -> None:
    plain = os.urandom(10 * SMALL + 123)
    sealed = encrypt_bytes(plain, key, chunk_size=SMALL)
    raw = DecryptingReader(io.BytesIO(sealed), ring)
    assert raw.size == len(plain)
    reader = io.BufferedReader(raw)
    for start, length in ((0, 10), (SMALL - 3, 10), (5 * SMALL, 3 * SMALL), (len(plain) - 5, 50)):
        reader.seek(start)
        assert reader.read(length) == plain[start : start + length]
    assert reader.seek(-4, io.SEEK_END) == len(plain) - 4
    assert reader.read() == plain[-4:]
    reader.close()
    assert raw.closed


def test_writer_patches_the_head_and_refuses_to_rewrite_sealed_chunks(
    key: DataKey, ring: Keyring
) -> None:
    raw = io.BytesIO()
    writer = EncryptingWriter(raw, key, chunk_size=SMALL, hold_chunks=2)
    data = bytearray(os.urandom(6 * SMALL + 10))
    writer.write(data[:100])
    writer.write(data[100:])
    writer.seek(10)  # patch the held head, as a muxer does with its header
    writer.write(b"DURATION")
    data[10:18] = b"DURATION"
    writer.seek(6 * SMALL + 3)  # the last chunk is still in memory too
    writer.write(b"x")
    data[6 * SMALL + 3] = ord("x")
    writer.seek(3 * SMALL)
    with pytest.raises(OSError):
        writer.write(b"no")  # chunk 3 is on disk already: its nonce is spent
    writer.seek(0, io.SEEK_END)
    writer.close()
    writer.close()
    assert decrypt_bytes(raw.getvalue(), ring) == bytes(data)


def test_writer_of_nothing_and_of_exact_chunks(key: DataKey, ring: Keyring) -> None:
    for size in (0, SMALL, 4 * SMALL):
        raw = io.BytesIO()
        writer = EncryptingWriter(raw, key, chunk_size=SMALL, hold_chunks=1)
        plain = os.urandom(size)
        writer.write(plain)
        writer.close()
        assert decrypt_bytes(raw.getvalue(), ring) == plain


def test_pyav_muxes_through_the_writer_and_demuxes_through_the_reader(
    key: DataKey, ring: Keyring, tmp_path: Path
) -> None:
    path = tmp_path / "clip.webm"
    with open(path, "wb") as raw:
        writer = EncryptingWriter(raw, key, hold_chunks=1)
        with av.open(writer, "w", format="webm") as container:
            stream = container.add_stream("libvpx", rate=15)
            stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
            stream.bit_rate = 2_000_000
            for i in range(45):
                frame = av.VideoFrame(160, 96, "yuv420p")
                for plane in frame.planes:
                    plane.update(os.urandom(plane.buffer_size))  # noise: several chunks
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        writer.close()
    stored = path.read_bytes()
    assert stored.startswith(MAGIC) and b"webm" not in stored and len(stored) > 4 * CHUNK_SIZE
    with DecryptingReader(open(path, "rb"), ring) as reader, av.open(reader, "r") as container:
        assert container.duration is not None and abs(container.duration / 1e6 - 3.0) < 0.1
        assert sum(1 for _ in container.decode(video=0)) == 45


# ---------------------------------------------------------------- manifest entries


def test_entry_data_is_bound_to_its_place(key: DataKey, ring: Keyring) -> None:
    data = {"name": "Иванова А. А.", "clinic": "ФАП Берёзовка"}
    sealed = seal_entry_data(data, key, 3, "participant")
    assert set(sealed) == {"encrypted"} and "Иванова" not in str(sealed)
    assert open_entry_data(sealed, ring, 3, "participant") == data
    with pytest.raises(DecryptionError):
        open_entry_data(sealed, ring, 4, "participant")  # moved to another entry
    with pytest.raises(DecryptionError):
        open_entry_data(sealed, ring, 3, "event")


# ---------------------------------------------------------------- keyring


def write_key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_key_file_lines_last_key_encrypts_all_decrypt(tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    text = f"# rotated 2026-01\n{base64.b64encode(old.secret).decode()}\n\n"
    text += base64.b64encode(new.secret).decode() + "\n"
    ring = Keyring.load(write_key_file(tmp_path / "keys", text.encode()))
    assert ring.active.id == new.id and ring.ids == [old.id, new.id]
    assert decrypt_bytes(encrypt_bytes(b"before rotation", old), ring) == b"before rotation"
    assert "secret" not in repr(ring) and base64.b64encode(old.secret).decode() not in repr(ring)


def test_raw_32_byte_key_file(tmp_path: Path) -> None:
    secret = secrets.token_bytes(32)
    ring = Keyring.load(write_key_file(tmp_path / "raw.key", secret))
    assert ring.active == DataKey(secret)


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (base64.b64encode(b"k" * 32) + b"\n", 0o644, "accessible to others"),
        (b"# nothing\n\n", 0o600, "no key"),
        (b"bm90IGEga2V5\n", 0o600, "line 1 is not base64 of 32 bytes"),
        (b"\xff" * 40, 0o600, "neither 32 raw bytes nor base64"),
    ],
)
def test_unusable_key_files_are_refused_clearly(
    tmp_path: Path, content: bytes, mode: int, message: str
) -> None:
    path = write_key_file(tmp_path / "keys", content, mode)
    with pytest.raises(EncryptionKeyError, match=message) as info:
        Keyring.load(path)
    assert "bm90IGEga2V5" not in str(info.value)
    with pytest.raises(EncryptionKeyError, match="No such file"):
        Keyring.load(tmp_path / "missing")


def test_new_key_is_appended_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "recording.keys"
    first = append_new_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    second = append_new_key(path)
    ring = Keyring.load(path)
    assert ring.ids == [first, second] and ring.active.id == second
    line, key_id = new_key_line()
    assert len(base64.b64decode(line)) == 32 and len(key_id) == 16
