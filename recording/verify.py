"""verify_recording: prove a recording directory is what its signed manifest says.

Status:

- ``intact``: every manifest entry matches its hash and the chain, every listed
  segment file exists with its SHA-256, and the seal's signature is valid for the
  given key;
- ``incomplete``: everything present verifies, but the recording was never sealed
  (a crash): a torn last line, a segment finished but not yet listed, or a
  ``.part`` file being written at the time are expected then, and reported;
- ``altered``: anything else — an entry changed, removed or reordered, a segment
  file changed or missing, a bad signature, entries after the seal, a segment
  file that the manifest does not list.

Without a seal a truncated manifest cannot be told from a crash: only a seal
proves the record is complete.

Encrypted recordings verify without the encryption key: the chain hashes the
entries as stored and the SHA-256 of a segment is that of the stored
(encrypted) file, so the seal covers the ciphertext; AES-GCM then guarantees
that what the key decrypts is what was written.  The report names the keys the
recording is encrypted with (``encryption_keys``, from the clear headers).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recording.errors import RecordingError
from recording.manifest import (
    ENTRY_KEYS,
    ENTRY_TYPES,
    GENESIS_HASH,
    MANIFEST_NAME,
    entry_hash,
    key_fingerprint,
    load_public_key_pem,
    seal_message,
)
from recording.segments import (
    TRACKS_DIR,
    SegmentInfo,
    parse_segment_name,
    segment_relpath,
)
from recording.storage import entry_key_id, file_key_id

Status = Literal["intact", "incomplete", "altered"]
Severity = Literal["altered", "incomplete", "note"]
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding; ``severity`` decides the report's status (notes do not)."""

    code: str
    message: str
    severity: Severity
    seq: int | None = None
    track_id: str | None = None
    segment_index: int | None = None
    path: str | None = None


@dataclass(slots=True)
class VerifyReport:
    directory: str
    status: Status = "intact"
    problems: list[Problem] = field(default_factory=list)
    entries: int = 0
    intact_through: int | None = None  # last seq of the unbroken, verified prefix
    sealed: bool = False
    signed_by: str | None = None  # key fingerprint of a valid seal
    segments_checked: int = 0
    encryption_keys: list[str] = field(default_factory=list)  # key ids, empty: not encrypted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)


@dataclass(slots=True)
class _Chain:
    entries: list[dict[str, Any]] = field(default_factory=list)
    torn: bytes = b""


def verify_recording(
    directory: str | os.PathLike[str], public_key: Ed25519PublicKey | str | bytes
) -> VerifyReport:
    """Check the manifest's hash chain, every segment file and the seal."""
    key = (
        public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key_pem(public_key)
    )
    root = Path(directory)
    report = VerifyReport(directory=str(root))
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        report.add(Problem("manifest_missing", f"{MANIFEST_NAME} is missing", "altered"))
        return _finish(report)
    chain = _check_chain(manifest.read_bytes(), report)
    report.entries = len(chain.entries)
    report.sealed = _check_seal(chain, key, report)
    _check_torn_tail(chain, report)
    listed = _check_segments(root, chain.entries, report)
    _check_unlisted(root, listed, report)
    _note_keys(root, chain.entries, listed, report)
    return _finish(report)


def _note_keys(
    root: Path, entries: list[dict[str, Any]], listed: dict[str, SegmentInfo], report: VerifyReport
) -> None:
    keys: set[str] = set()
    for entry in entries:
        try:
            key_id = entry_key_id(entry)
        except RecordingError:
            continue  # garbled: the chain check has said so
        if key_id:
            keys.add(key_id)
    for info in listed.values():
        try:
            key_id = file_key_id(root / info.path)
        except (OSError, RecordingError):
            continue
        if key_id:
            keys.add(key_id)
    report.encryption_keys = sorted(keys)


def _finish(report: VerifyReport) -> VerifyReport:
    severities = {p.severity for p in report.problems}
    if "altered" in severities:
        report.status = "altered"
    elif "incomplete" in severities:
        report.status = "incomplete"
    else:
        report.status = "intact"
    return report


# ---------------------------------------------------------------- chain


def _parse_entry(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        return None
    ok = (
        isinstance(entry["seq"], int)
        and not isinstance(entry["seq"], bool)
        and entry["type"] in ENTRY_TYPES
        and isinstance(entry["data"], dict)
        and isinstance(entry["prev"], str)
        and isinstance(entry["hash"], str)
        and isinstance(entry["at"], str)
    )
    return entry if ok else None


def _check_chain(raw: bytes, report: VerifyReport) -> _Chain:
    lines = raw.split(b"\n")
    chain = _Chain(torn=lines.pop())  # b"" when the file ends with a newline
    expected, prev_hash, unbroken = 0, GENESIS_HASH, True
    for lineno, line in enumerate(lines, 1):
        entry = _parse_entry(line)
        if entry is None:
            report.add(
                Problem("entry_unreadable", f"line {lineno} is not a manifest entry", "altered")
            )
            unbroken = False
            continue
        seq: int = entry["seq"]
        ok = _check_link(entry, expected, prev_hash, report)
        unbroken = unbroken and ok
        if unbroken:
            report.intact_through = seq
        chain.entries.append(entry)
        # Continue from the stored hash: one changed entry is one finding, not a cascade.
        expected, prev_hash = seq + 1, entry["hash"]
    return chain


def _check_link(entry: dict[str, Any], expected: int, prev_hash: str, report: VerifyReport) -> bool:
    seq: int = entry["seq"]
    ok = True
    if seq > expected:
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}–{seq - 1}"
        report.add(Problem("entry_missing", f"entry missing: {missing}", "altered", seq=expected))
        ok = False
    elif seq < expected:
        report.add(
            Problem(
                "entry_out_of_order",
                f"entry {seq} appears where entry {expected} was expected",
                "altered",
                seq=seq,
            )
        )
        ok = False
    if entry_hash(entry) != entry["hash"]:
        report.add(Problem("hash_mismatch", f"entry {seq} hash mismatch", "altered", seq=seq))
        ok = False
    if entry["prev"] != prev_hash:
        report.add(
            Problem(
                "chain_broken",
                f"chain broken at entry {seq}: prev is not the hash of the entry before it",
                "altered",
                seq=seq,
            )
        )
        ok = False
    return ok


def _check_torn_tail(chain: _Chain, report: VerifyReport) -> None:
    if not chain.torn:
        return
    if report.sealed:
        report.add(Problem("after_seal", f"{len(chain.torn)} bytes follow the seal", "altered"))
        return
    last = report.intact_through
    upto = f"entries 0–{last} verify" if last is not None else "no entry verifies"
    report.add(
        Problem(
            "torn_last_line",
            f"manifest ends with a torn line of {len(chain.torn)} bytes "
            f"(crash while writing); {upto}",
            "incomplete",
            seq=None if last is None else last + 1,
        )
    )


# ---------------------------------------------------------------- seal


def _check_seal(chain: _Chain, key: Ed25519PublicKey, report: VerifyReport) -> bool:
    entries = chain.entries
    seals = [i for i, e in enumerate(entries) if e["type"] == "sealed"]
    if not seals:
        stopped = any(e["type"] == "recording_stopped" for e in entries)
        why = "stopped but never sealed" if stopped else "no recording_stopped, no seal (crash?)"
        report.add(Problem("not_sealed", f"not sealed: {why}", "incomplete"))
        return False
    pos = seals[0]
    seal = entries[pos]
    if pos != len(entries) - 1:
        after = ", ".join(str(e["seq"]) for e in entries[pos + 1 :])
        report.add(
            Problem(
                "after_seal", f"entries after the seal: seq {after}", "altered", seq=seal["seq"]
            )
        )
    data = seal["data"]
    expected_fp = key_fingerprint(key)
    signed_hash = data.get("signed_hash")
    head = entries[pos - 1]["hash"] if pos > 0 else None
    if data.get("key_fingerprint") != expected_fp:
        report.add(
            Problem(
                "signature_invalid",
                f"sealed with key {data.get('key_fingerprint')}, not {expected_fp}",
                "altered",
                seq=seal["seq"],
            )
        )
        return True
    if signed_hash != head or signed_hash != seal["prev"]:
        report.add(
            Problem(
                "signature_invalid",
                "the seal does not sign the entry before it",
                "altered",
                seq=seal["seq"],
            )
        )
        return True
    try:
        signature = base64.b64decode(str(data.get("signature", "")), validate=True)
        key.verify(signature, seal_message(str(signed_hash), expected_fp))
    except (InvalidSignature, binascii.Error, ValueError):
        report.add(
            Problem("signature_invalid", "seal signature invalid", "altered", seq=seal["seq"])
        )
        return True
    report.signed_by = expected_fp
    return True


# ---------------------------------------------------------------- segments


def _check_segments(
    root: Path, entries: list[dict[str, Any]], report: VerifyReport
) -> dict[str, SegmentInfo]:
    listed: dict[str, SegmentInfo] = {}
    for entry in entries:
        if entry["type"] != "segment":
            continue
        seq = entry["seq"]
        try:
            info = SegmentInfo.from_dict(entry["data"])
        except ValueError as exc:
            report.add(Problem("segment_malformed", f"entry {seq}: {exc}", "altered", seq=seq))
            continue
        where = f"track {info.track_id} segment {info.index} ({info.path})"
        ids = {
            "seq": seq,
            "track_id": info.track_id,
            "segment_index": info.index,
            "path": info.path,
        }
        if not _is_canonical(info):
            report.add(
                Problem("segment_path", f"unexpected segment path: {where}", "altered", **ids)
            )
            continue
        if info.path in listed:
            report.add(Problem("segment_duplicate", f"listed twice: {where}", "altered", **ids))
            continue
        listed[info.path] = info
        file = root / info.path
        if not file.is_file():
            report.add(
                Problem("segment_missing", f"segment file missing: {where}", "altered", **ids)
            )
            continue
        sha256, size = _hash_file(file)
        report.segments_checked += 1
        if sha256 != info.sha256:
            report.add(
                Problem(
                    "segment_sha256_mismatch",
                    f"segment SHA-256 mismatch: {where}, {size} bytes on disk, {info.size} listed",
                    "altered",
                    **ids,
                )
            )
        elif size != info.size:
            report.add(
                Problem("segment_size_mismatch", f"size mismatch: {where}", "altered", **ids)
            )
    return listed


def _is_canonical(info: SegmentInfo) -> bool:
    path = PurePosixPath(info.path)
    if path.is_absolute() or ".." in path.parts:
        return False
    try:
        return info.path == segment_relpath(info.track_id, info.index)
    except ValueError:
        return False


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _check_unlisted(root: Path, listed: dict[str, SegmentInfo], report: VerifyReport) -> None:
    """Files under tracks/ that the manifest does not list."""
    tracks = root / TRACKS_DIR
    if not tracks.is_dir():
        return
    last_index: dict[str, int] = {}
    for info in listed.values():
        last_index[info.track_id] = max(last_index.get(info.track_id, -1), info.index)
    for path in sorted(p for p in tracks.rglob("*") if not p.is_dir()):
        rel = path.relative_to(root).as_posix()
        if rel in listed:
            continue
        report.add(_unlisted_problem(rel, path, last_index, report.sealed))


def _unlisted_problem(rel: str, path: Path, last_index: dict[str, int], sealed: bool) -> Problem:
    parts = PurePosixPath(rel).parts
    parsed = parse_segment_name(parts[2]) if len(parts) == 3 else None
    if parsed is None:
        return Problem("unlisted_file", f"file not in the manifest: {rel}", "altered", path=rel)
    index, partial = parsed
    track_id = path.parent.name
    ids: dict[str, Any] = {"track_id": track_id, "segment_index": index, "path": rel}
    where = f"track {track_id} segment {index} ({rel})"
    if partial:
        # never part of the record (not hashed, not listed): a crash or a write error
        return Problem(
            "partial_segment", f"unfinished segment, not in the record: {where}", "note", **ids
        )
    if not sealed and index == last_index.get(track_id, -1) + 1:
        return Problem(
            "unlisted_at_crash",
            f"segment finished but not listed before the crash: {where}",
            "incomplete",
            **ids,
        )
    return Problem(
        "unlisted_segment", f"segment file not in the manifest: {where}", "altered", **ids
    )
