"""FHIR R4 export: a DocumentReference for an exported recording, and its Encounter.

:func:`recording_bundle` returns a ``Bundle`` of type ``collection`` holding both
resources, linked through ``urn:uuid:`` full URLs (ids are UUIDv5 of the
recording and consultation ids, so re-exporting gives the same ids).
:func:`document_reference` and :func:`encounter` build each resource alone, for
an EHR that already has its own Encounter (pass ``encounter_ref``).

Codes:

- ``DocumentReference.type``: LOINC 11488-4 "Consult note", with the text
  "Video recording of a telemedicine consultation".  LOINC's document ontology
  has no "video recording" kind of document; the recording is the record of a
  consultation (the council), which 11488-4 names.  (18748-4 "Diagnostic imaging
  study" would be wrong: this is not imaging.)  That the content is video is said
  by ``category`` (``media-type#video``, the code system of R4 ``Media.type``)
  and by the attachment's ``contentType``.
- ``Encounter.class``: v3-ActCode ``VR`` (virtual); ``Encounter.type``: SNOMED CT
  11429006 "Consultation".
- ``securityLabel``: v3-Confidentiality ``R`` (restricted): special-category health
  data (152-FZ art. 10).

``Attachment.hash`` is base64 of the SHA-1 of the exported file as it is
delivered (R4 says SHA-1): an encrypted media file is delivered decrypted, so
size and hash are those of its plaintext (read through ``recording.storage``);
``Attachment.size`` is R4 ``unsignedInt`` (≤ 2^31-1) and is left out above that
(R5 makes it integer64).
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from recording.keyring import Keyring
from recording.storage import media_digest

log = logging.getLogger(__name__)

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RFC3986 = "urn:ietf:rfc:3986"
DEFAULT_ID_SYSTEM = "urn:konsilium"
UNSIGNED_INT_MAX = 2**31 - 1
_ID_NAMESPACE = uuid.UUID("6f6b3c1e-6b1a-5d4e-9c55-4b6f6e73696c")  # Konsilium's own
_ROLE_CODES = {
    "chair": ("PPRF", "primary performer"),
    "expert": ("CON", "consultant"),
    "specialist": ("CON", "consultant"),
    "consultant": ("CON", "consultant"),
}


@dataclass(frozen=True, slots=True)
class Party:
    """Someone in the record: a FHIR reference when the EHR has one, a display name always."""

    display: str
    reference: str | None = None  # e.g. "Practitioner/123"
    role: str | None = None  # chair, expert, feldsher, …

    def to_reference(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"display": self.display}
        if self.reference:
            ref["reference"] = self.reference
        return ref


@dataclass(frozen=True, slots=True)
class RecordingMeta:
    recording_id: str
    consultation_id: str
    started_at: datetime
    ended_at: datetime
    title: str = "Telemedicine consultation (council), video recording"
    patient_ref: str | None = None  # "Patient/…", when known
    authors: tuple[Party, ...] = ()
    participants: tuple[Party, ...] = ()
    manifest_hash: str | None = None  # the sealed chain head, ties the export to its manifest
    id_system: str = DEFAULT_ID_SYSTEM
    extra_identifiers: Mapping[str, str] = field(default_factory=dict)

    @property
    def document_id(self) -> str:
        return str(uuid.uuid5(_ID_NAMESPACE, f"recording:{self.recording_id}"))

    @property
    def encounter_id(self) -> str:
        return str(uuid.uuid5(_ID_NAMESPACE, f"consultation:{self.consultation_id}"))


def meta_from_manifest(entries: Sequence[Mapping[str, Any]], **overrides: Any) -> RecordingMeta:
    """RecordingMeta from a manifest's decrypted entries (``recording.storage.read_entries``)."""
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        by_type.setdefault(str(entry["type"]), []).append(entry)
    if "recording_started" not in by_type:
        raise ValueError("manifest has no recording_started entry")
    started = by_type["recording_started"][0]
    stopped = by_type.get("recording_stopped", [entries[-1]])[0]
    people = tuple(
        Party(display=str(e["data"]["name"]), role=str(e["data"].get("role") or "") or None)
        for e in by_type.get("participant", [])
    )
    seal = by_type.get("sealed")
    values: dict[str, Any] = {
        "recording_id": str(started["data"]["recording_id"]),
        "consultation_id": str(started["data"]["consultation_id"]),
        "started_at": _parse_time(str(started["at"])),
        "ended_at": _parse_time(str(stopped["at"])),
        "patient_ref": started["data"].get("patient_ref"),
        "authors": tuple(p for p in people if p.role == "chair"),
        "participants": people,
        "manifest_hash": str(seal[0]["data"]["signed_hash"]) if seal else None,
    }
    values.update(overrides)
    return RecordingMeta(**values)


def file_digest(path: str | os.PathLike[str], keyring: Keyring | None = None) -> tuple[int, str]:
    """(size, base64 SHA-1) of a file as delivered (decrypted): R4 Attachment.size and .hash."""
    size, sha1 = media_digest(path, keyring, "sha1")
    return size, base64.b64encode(sha1).decode("ascii")


def document_reference(
    meta: RecordingMeta,
    *,
    url: str,
    export_path: str | os.PathLike[str],
    encounter_ref: str | None = None,
    content_type: str = "video/webm",
    now: datetime | None = None,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """R4 DocumentReference for the exported file at ``export_path``, served at ``url``."""
    size, sha1_b64 = file_digest(export_path, keyring)
    attachment: dict[str, Any] = {
        "contentType": content_type,
        "url": url,
        "hash": sha1_b64,
        "title": meta.title,
        "creation": _fhir_time(meta.started_at),
    }
    if size <= UNSIGNED_INT_MAX:
        attachment["size"] = size
    else:
        log.warning(
            "%s: export is %d bytes, over R4 unsignedInt: size left out", meta.recording_id, size
        )
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": meta.document_id,
        "masterIdentifier": {"system": RFC3986, "value": f"urn:uuid:{meta.document_id}"},
        "identifier": _identifiers(meta),
        "status": "current",
        "docStatus": "final",
        "type": {
            "coding": [{"system": LOINC, "code": "11488-4", "display": "Consult note"}],
            "text": "Video recording of a telemedicine consultation",
        },
        "category": [{"coding": [{"system": MEDIA_TYPE, "code": "video", "display": "Video"}]}],
        "date": _fhir_time(now or datetime.now(UTC)),
        "description": _description(meta),
        "securityLabel": [
            {"coding": [{"system": CONFIDENTIALITY, "code": "R", "display": "restricted"}]}
        ],
        "content": [{"attachment": attachment}],
        "context": {
            "encounter": [{"reference": encounter_ref or f"Encounter/{meta.encounter_id}"}],
            "period": _period(meta),
        },
    }
    if meta.patient_ref:
        doc["subject"] = {"reference": meta.patient_ref}
    if meta.authors:
        doc["author"] = [a.to_reference() for a in meta.authors]
    return doc


def encounter(meta: RecordingMeta) -> dict[str, Any]:
    """R4 Encounter of the consultation: finished, class VR (virtual)."""
    enc: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": meta.encounter_id,
        "identifier": [
            {"system": f"{meta.id_system}:consultation-id", "value": meta.consultation_id}
        ],
        "status": "finished",
        "class": {"system": ACT_CODE, "code": "VR", "display": "virtual"},
        "type": [
            {
                "coding": [{"system": SNOMED, "code": "11429006", "display": "Consultation"}],
                "text": "Telemedicine council",
            }
        ],
        "period": _period(meta),
    }
    if meta.patient_ref:
        enc["subject"] = {"reference": meta.patient_ref}
    if meta.participants:
        enc["participant"] = [_participant(p) for p in meta.participants]
    return enc


def recording_bundle(
    meta: RecordingMeta,
    *,
    url: str,
    export_path: str | os.PathLike[str],
    content_type: str = "video/webm",
    now: datetime | None = None,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """Bundle (collection) of the DocumentReference and the Encounter it points to."""
    moment = now or datetime.now(UTC)
    enc_url = f"urn:uuid:{meta.encounter_id}"
    doc = document_reference(
        meta,
        url=url,
        export_path=export_path,
        encounter_ref=enc_url,
        content_type=content_type,
        now=moment,
        keyring=keyring,
    )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(_ID_NAMESPACE, f"bundle:{meta.recording_id}")),
        "type": "collection",
        "timestamp": _fhir_time(moment),
        "entry": [
            {"fullUrl": f"urn:uuid:{meta.document_id}", "resource": doc},
            {"fullUrl": enc_url, "resource": encounter(meta)},
        ],
    }


# ---------------------------------------------------------------- helpers


def _identifiers(meta: RecordingMeta) -> list[dict[str, str]]:
    ids = [{"system": f"{meta.id_system}:recording-id", "value": meta.recording_id}]
    if meta.manifest_hash:
        ids.append({"system": f"{meta.id_system}:manifest-sha256", "value": meta.manifest_hash})
    ids.extend({"system": s, "value": v} for s, v in meta.extra_identifiers.items())
    return ids


def _description(meta: RecordingMeta) -> str:
    names = ", ".join(p.display for p in meta.participants)
    text = meta.title
    if names:
        text += f". Participants: {names}"
    if meta.manifest_hash:
        text += f". Signed manifest chain head: {meta.manifest_hash}"
    return text


def _participant(party: Party) -> dict[str, Any]:
    entry: dict[str, Any] = {"individual": party.to_reference()}
    code, display = _ROLE_CODES.get((party.role or "").lower(), ("PART", "Participation"))
    entry["type"] = [{"coding": [{"system": PARTICIPATION_TYPE, "code": code, "display": display}]}]
    return entry


def _period(meta: RecordingMeta) -> dict[str, str]:
    return {"start": _fhir_time(meta.started_at), "end": _fhir_time(meta.ended_at)}


def _fhir_time(moment: datetime) -> str:
    """FHIR instant/dateTime with a zone: naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)
