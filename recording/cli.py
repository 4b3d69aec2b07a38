"""``konsilium recordings list | verify | render | export --fhir | purge-expired | new-key``.

Works on the data directory of a server (running or not), like ``konsilium
token``.  ``verify`` exits 0 when the recording is intact, 1 when incomplete
(never sealed: a crash), 2 when altered, 3 when there is no such recording or no
key to check it with.  ``export`` refuses an altered recording and, unless
``--allow-incomplete``, an unsealed one.

Encrypted recordings (setting ``recording_key_file``): ``verify`` needs no key
(it checks the stored bytes against the signed manifest and names the key a
recording needs); ``list``, ``export`` and ``purge-expired`` read the
manifest's personal data and need the key; ``new-key`` appends a fresh key to
the key file.

Every use is an access to the medical record: it is appended to the audit log
— the Store's when ``redis_url`` is configured (shared with the servers), else
``<data_dir>/audit/cli.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recording.errors import RecordingError
from recording.fhir import meta_from_manifest, recording_bundle
from recording.keyring import EncryptionKeyError, Keyring, append_new_key
from recording.manifest import (
    KEY_DIR,
    KEY_FILE,
    MANIFEST_NAME,
    RecordingKeyError,
    RecordingKeys,
    load_public_key_pem,
)
from recording.playback import COMPOSITE_NAME
from recording.registry import UnknownRecording, list_recordings, recording_dir
from recording.retention import SweepReport, sweep
from recording.storage import read_entries
from recording.verify import VerifyReport, verify_recording

if TYPE_CHECKING:
    from signalling.settings import Settings
    from signalling.store import AuditEvent

EXIT_INTACT, EXIT_INCOMPLETE, EXIT_ALTERED, EXIT_NOT_FOUND = 0, 1, 2, 3
STATUS_EXIT = {"intact": EXIT_INTACT, "incomplete": EXIT_INCOMPLETE, "altered": EXIT_ALTERED}
MANIFEST_CONTENT_TYPE = "application/x-ndjson"
MEDIA_TYPES = {".webm": "video/webm", ".mkv": "video/x-matroska", ".mp4": "video/mp4"}
CLI_AUDIT_FILE = Path("audit") / "cli.jsonl"


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_recordings_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    add_common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """``recordings`` and its sub-commands; ``add_common`` adds --data-dir/--config."""
    p = commands.add_parser(
        "recordings",
        help="list, verify and export recordings",
        description="Recordings in the data directory (see 'konsilium recordings CMD --help').",
    )
    sub = p.add_subparsers(dest="recordings_command", required=True, metavar="CMD")

    ls = sub.add_parser("list", help="list the recordings")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_common(ls)
    add_key_file_argument(ls)
    ls.set_defaults(handler=_list)

    vf = sub.add_parser(
        "verify",
        help="check a recording against its signed manifest",
        description="Exit code: 0 intact, 1 incomplete (never sealed), 2 altered, "
        "3 no such recording or no key.  Encrypted recordings verify without "
        "the encryption key.",
    )
    vf.add_argument("recording_id", metavar="ID")
    vf.add_argument("--public-key", type=Path, help="PEM public key (default: the data dir's key)")
    vf.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common(vf)
    vf.set_defaults(handler=_verify)

    from .render_cli import add_render_arguments, run_render

    rd = sub.add_parser(
        "render",
        help="make the composite (grid) video of a recording, with a progress bar",
    )
    add_render_arguments(rd)
    rd.set_defaults(handler=run_render)

    ex = sub.add_parser(
        "export",
        help="export a recording for the medical record",
        description="Print an HL7 FHIR R4 Bundle (DocumentReference + Encounter, class VR). "
        "The attachment is the sealed manifest unless --media names the exported file.",
    )
    ex.add_argument("recording_id", metavar="ID")
    ex.add_argument("--fhir", action="store_true", required=True, help="FHIR R4 JSON")
    ex.add_argument("--out", type=Path, help="write to FILE instead of standard output")
    ex.add_argument("--media", type=Path, help="the exported media file (e.g. a composite)")
    ex.add_argument("--public-url", help="base URL of the server (default: the settings')")
    ex.add_argument("--public-key", type=Path, help="PEM public key (default: the data dir's key)")
    ex.add_argument(
        "--allow-incomplete", action="store_true", help="export a recording that was never sealed"
    )
    add_common(ex)
    add_key_file_argument(ex)
    ex.set_defaults(handler=_export)

    pg = sub.add_parser(
        "purge-expired",
        help="delete the sealed recordings older than the retention period",
        description="Delete (or with --dry-run, list) the sealed and stopped recordings "
        "older than retention_days (a room's own retention_days, read from the shared "
        "Store when redis_url is set, overrides it; 0 keeps forever).  Recordings that "
        "were never sealed are reported, never deleted.",
    )
    pg.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    add_common(pg)
    add_key_file_argument(pg)
    pg.set_defaults(handler=_purge_expired)

    nk = sub.add_parser(
        "new-key",
        help="append a new encryption key to the recording key file",
        description="Append a fresh random AES-256 key (base64) to the recording key file "
        "(created with mode 0600 if missing) and print its id.  The last key of the file "
        "encrypts new recordings after the next start; keep the older keys: they decrypt "
        "the recordings made with them.",
    )
    add_common(nk)
    add_key_file_argument(nk)
    nk.set_defaults(handler=_new_key)


def add_key_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recording-key-file",
        type=Path,
        help="recording encryption keys (default: the recording_key_file setting)",
    )


# ---------------------------------------------------------------- handlers


def _settings(args: argparse.Namespace, **extra: object) -> Settings:
    from signalling.settings import load_settings

    cli = {
        "data_dir": args.data_dir,
        "recording_key_file": getattr(args, "recording_key_file", None),
        **extra,
    }
    return load_settings(cli, os.environ, args.config)


def load_keyring(settings: Settings) -> Keyring | None:
    """The configured recording keys, or None; CliError (exit 3) when the file is unusable."""
    if settings.recording_key_file is None:
        return None
    try:
        return Keyring.load(settings.recording_key_file)
    except EncryptionKeyError as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from None


def _run(args: argparse.Namespace, body: Callable[[Settings], int]) -> int:
    settings = _settings(args, public_url=getattr(args, "public_url", None))
    try:
        return body(settings)
    except CliError as exc:
        print(f"konsilium recordings: {exc}", file=sys.stderr)
        return exc.code


def _list(args: argparse.Namespace) -> int:
    def body(settings: Settings) -> int:
        found = list_recordings(settings.data_dir, load_keyring(settings))
        _audit(settings, "recording_list", "*", "ok")
        if args.json:
            print(json.dumps([s.to_json() for s in found], ensure_ascii=False, indent=2))
            return 0
        if not found:
            print("no recordings")
            return 0
        print(
            f"{'ID':<30} {'ROOM':<20} {'STARTED':<24} {'STOP':<12} "
            "SEALED TRACKS SEGMENTS   MB ENCRYPTED"
        )
        for s in found:
            print(
                f"{s.id:<30} {(s.room or '?')[:20]:<20} {s.started_at or '?':<24} "
                f"{(s.stop_reason or '-')[:12]:<12} {'yes' if s.sealed else 'no':<6} "
                f"{s.tracks:>6} {s.segments:>8} {s.bytes / 1e6:>4.1f} "
                f"{'yes' if s.encrypted else 'no'}"
            )
        return 0

    return _run(args, body)


def _verify(args: argparse.Namespace) -> int:
    def body(settings: Settings) -> int:
        directory = _directory(settings.data_dir, args.recording_id)
        report = verify_recording(directory, _public_key(settings.data_dir, args.public_key))
        _audit(settings, "recording_verify", args.recording_id, report.status)
        if args.json:
            print(json.dumps({"recording_id": args.recording_id, **report.to_dict()}, indent=2))
        else:
            print_report(args.recording_id, report, sys.stdout)
        return STATUS_EXIT[report.status]

    return _run(args, body)


def print_report(recording_id: str, report: VerifyReport, out: TextIO) -> None:
    facts = f"{report.entries} entries, {report.segments_checked} segments checked"
    if report.signed_by:
        facts += f", sealed by {report.signed_by}"
    elif report.intact_through is not None and report.status != "intact":
        facts += f", entries 0–{report.intact_through} verify"
    print(f"{recording_id}: {report.status} ({facts})", file=out)
    if report.encryption_keys:
        print(f"  encrypted at rest with key {', '.join(report.encryption_keys)}", file=out)
    for problem in report.problems:
        print(f"  {problem.severity:<10} {problem.code}: {problem.message}", file=out)


def _export(args: argparse.Namespace) -> int:
    def body(settings: Settings) -> int:
        directory = _directory(settings.data_dir, args.recording_id)
        report = verify_recording(directory, _public_key(settings.data_dir, args.public_key))
        if report.status == "altered" or (
            report.status == "incomplete" and not args.allow_incomplete
        ):
            _audit(settings, "recording_export", args.recording_id, f"refused_{report.status}")
            print_report(args.recording_id, report, sys.stderr)
            hint = "" if report.status == "altered" else " (--allow-incomplete to export anyway)"
            raise CliError(f"not exported: the recording is {report.status}{hint}", 2)
        try:
            bundle = fhir_export(
                directory,
                base_url=settings.base_url,
                media=args.media,
                recording_id=args.recording_id,
                keyring=load_keyring(settings),
            )
        except RecordingError as exc:  # KeyUnavailable, DecryptionError
            _audit(settings, "recording_export", args.recording_id, "refused_key")
            raise CliError(f"not exported: {exc}", EXIT_NOT_FOUND) from None
        text = json.dumps(bundle, ensure_ascii=False, indent=2) + "\n"
        if args.out is not None:
            args.out.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        _audit(settings, "recording_export", args.recording_id, "ok")
        return 0

    return _run(args, body)


def fhir_export(
    directory: Path,
    *,
    base_url: str,
    recording_id: str,
    media: Path | None = None,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """The FHIR R4 Bundle of a recording; the attachment is ``media`` or the manifest.

    The manifest attachment is the signed journal as stored (what verifies against
    the seal); a media attachment is described as delivered, decrypted.  The
    recording's own composite is delivered by the playback endpoint, which is then
    the attachment's url.
    """
    meta = meta_from_manifest(read_entries(directory, keyring))
    url = f"{base_url.rstrip('/')}/api/recordings/{recording_id}"
    if media is not None:
        if not media.is_file():
            raise CliError(f"{media}: no such file", EXIT_NOT_FOUND)
        path, content_type = media, MEDIA_TYPES.get(media.suffix.lower(), "video/webm")
        if media.resolve() == (directory / COMPOSITE_NAME).resolve():
            url = f"{base_url.rstrip('/')}/recordings/{recording_id}/media/composite"
    else:
        path, content_type = directory / MANIFEST_NAME, MANIFEST_CONTENT_TYPE
    return recording_bundle(
        meta, url=url, export_path=path, content_type=content_type, keyring=keyring
    )


def _purge_expired(args: argparse.Namespace) -> int:
    def body(settings: Settings) -> int:
        report = asyncio.run(_purge(settings, dry_run=args.dry_run))
        verb = "would delete" if args.dry_run else "deleted"
        for d in report.deleted:
            print(f"{verb} {d.id} (stopped {d.stopped_at}, retention {d.retention_days} days)")
        for d in report.failed:
            print(f"could not delete {d.id}", file=sys.stderr)
        for recording_id in report.incomplete:
            print(f"kept {recording_id}: not sealed and stopped (incomplete), check it")
        for recording_id in report.locked:
            print(f"kept {recording_id}: encrypted with a key that is not configured")
        print(
            f"{len(report.deleted)} {verb}, {len(report.kept)} kept, "
            f"{len(report.incomplete)} incomplete, {len(report.failed)} failed"
        )
        _audit(settings, "recording_purge", "*", "dry_run" if args.dry_run else "ok")
        return 1 if report.failed else 0

    return _run(args, body)


async def _purge(settings: Settings, *, dry_run: bool) -> SweepReport:
    """One retention sweep; audit to the shared Store (Redis) or the CLI audit file."""
    actor = _actor()
    keyring = load_keyring(settings)
    if settings.redis_url:
        from signalling.store_factory import open_store

        store = await open_store(settings.redis_url)
        try:
            return await sweep(
                settings.data_dir,
                store,
                retention_days=settings.retention_days,
                dry_run=dry_run,
                actor=actor,
                keyring=keyring,
            )
        finally:
            await store.close()

    async def to_file(event: AuditEvent) -> None:
        try:
            _append_audit_file(settings.data_dir, event)
        except OSError as exc:
            print(f"konsilium recordings: warning: audit log not written: {exc}", file=sys.stderr)

    return await sweep(
        settings.data_dir,
        None,
        retention_days=settings.retention_days,
        dry_run=dry_run,
        actor=actor,
        audit=to_file,
        keyring=keyring,
    )


def _new_key(args: argparse.Namespace) -> int:
    def body(settings: Settings) -> int:
        path = settings.recording_key_file
        if path is None:
            raise CliError("give --recording-key-file (or set recording_key_file)", 2)
        try:
            key_id = append_new_key(path)
        except (EncryptionKeyError, OSError) as exc:
            raise CliError(str(exc), EXIT_NOT_FOUND) from None
        _audit(settings, "recording_key_created", key_id, "ok")
        print(f"{path}: added key {key_id}; new recordings use it after the next start")
        print("keep a copy of the file somewhere safe: without it no recording can be read")
        return 0

    return _run(args, body)


# ---------------------------------------------------------------- helpers


def _directory(data_dir: Path, recording_id: str) -> Path:
    try:
        return recording_dir(data_dir, recording_id)
    except UnknownRecording:
        raise CliError(f"no recording {recording_id!r} in {data_dir}", EXIT_NOT_FOUND) from None


def _public_key(data_dir: Path, given: Path | None) -> Ed25519PublicKey:
    try:
        if given is not None:
            return load_public_key_pem(given.read_bytes())
        if not (data_dir / KEY_DIR / KEY_FILE).is_file():
            raise CliError(
                f"no recording key in {data_dir / KEY_DIR}: give --public-key", EXIT_NOT_FOUND
            )
        return RecordingKeys.load_or_create(data_dir).public_key()
    except (OSError, ValueError, RecordingKeyError) as exc:
        raise CliError(f"cannot read the key: {exc}", EXIT_NOT_FOUND) from None


def _audit(settings: Settings, action: str, target: str, outcome: str) -> None:
    """Append to the Store's audit log (Redis) or the data dir's CLI audit file."""
    from signalling.store import AuditEvent

    event = AuditEvent(
        at=time.time(),
        actor=_actor(),
        action=action,
        target=target,
        outcome=outcome,
        detail={"host": os.uname().nodename},
    )
    try:
        if settings.redis_url:
            asyncio.run(_audit_store(settings.redis_url, event))
            return
        _append_audit_file(settings.data_dir, event)
    except Exception as exc:
        print(f"konsilium recordings: warning: audit log not written: {exc}", file=sys.stderr)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


def _append_audit_file(data_dir: Path, event: AuditEvent) -> None:
    """Append one event to ``<data_dir>/audit/cli.jsonl`` (raises OSError)."""
    path = Path(data_dir) / CLI_AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = json.dumps(asdict(event), ensure_ascii=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


async def _audit_store(redis_url: str, event: AuditEvent) -> None:
    from signalling.store_factory import open_store

    store = await open_store(redis_url)
    try:
        await store.append_audit(event)
    finally:
        await store.close()
