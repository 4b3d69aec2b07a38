"""FHIR R4 DocumentReference + Encounter export, validated with fhir.resources (R4B models)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.encounter import Encounter

from recording.fhir import (
    Party,
    RecordingMeta,
    document_reference,
    encounter,
    meta_from_manifest,
    recording_bundle,
)
from recording.manifest import Manifest, read_entries

START = datetime(2025, 9, 1, 10, 0, tzinfo=UTC)
NOW = datetime(2025, 9, 1, 12, 0, tzinfo=UTC)
URL = "https://konsilium.example/recordings/rec-1/export.webm"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "export.webm"
    path.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 40)
    return path


@pytest.fixture
def meta() -> RecordingMeta:
    return RecordingMeta(
        recording_id="rec-1",
        consultation_id="cons-42",
        started_at=START,
        ended_at=START + timedelta(minutes=37),
        patient_ref="Patient/p-1",
        authors=(Party("Dr A", reference="Practitioner/pr-9", role="chair"),),
        participants=(
            Party("Dr A", reference="Practitioner/pr-9", role="chair"),
            Party("F B", role="feldsher"),
            Party("Prof C", role="expert"),
        ),
        manifest_hash="ab" * 32,
    )


def test_bundle_validates_and_carries_the_attachment(meta: RecordingMeta, export: Path) -> None:
    bundle_json = recording_bundle(meta, url=URL, export_path=export, now=NOW)
    bundle = Bundle.model_validate(bundle_json)
    assert bundle.type == "collection"
    assert bundle.entry is not None and len(bundle.entry) == 2
    doc_json, enc_json = (e["resource"] for e in bundle_json["entry"])
    doc = DocumentReference.model_validate(doc_json)
    enc = Encounter.model_validate(enc_json)

    data = export.read_bytes()
    attachment = doc.content[0].attachment
    assert attachment.contentType == "video/webm"
    assert attachment.url == URL
    assert attachment.size == len(data)
    assert attachment.hash == hashlib.sha1(data).digest()  # the model decodes base64
    assert base64.b64decode(doc_json["content"][0]["attachment"]["hash"]) == attachment.hash
    assert doc.status == "current" and doc.docStatus == "final"
    assert doc.type is not None and doc.type.coding is not None
    assert doc.type.coding[0].system == "http://loinc.org"
    assert doc.type.coding[0].code == "11488-4"
    assert doc.subject is not None and doc.subject.reference == "Patient/p-1"
    assert doc.author is not None and doc.author[0].reference == "Practitioner/pr-9"
    assert doc_json["context"]["period"] == {
        "start": "2025-09-01T10:00:00.000Z",
        "end": "2025-09-01T10:37:00.000Z",
    }
    # the DocumentReference points at the Encounter in the same bundle
    assert doc_json["context"]["encounter"][0]["reference"] == bundle_json["entry"][1]["fullUrl"]

    assert enc.class_fhir.code == "VR"
    assert enc.class_fhir.system == "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    assert enc.status == "finished"
    roles = [p["type"][0]["coding"][0]["code"] for p in enc_json["participant"]]
    assert roles == ["PPRF", "PART", "CON"]


def test_resources_alone_and_stable_ids(meta: RecordingMeta, export: Path) -> None:
    doc = document_reference(
        meta, url=URL, export_path=export, encounter_ref="Encounter/ehr-7", now=NOW
    )
    DocumentReference.model_validate(doc)
    assert doc["context"]["encounter"] == [{"reference": "Encounter/ehr-7"}]
    enc = encounter(meta)
    Encounter.model_validate(enc)
    again = recording_bundle(meta, url=URL, export_path=export, now=NOW)
    assert again == recording_bundle(meta, url=URL, export_path=export, now=NOW)
    assert again["entry"][0]["resource"]["id"] == meta.document_id


def test_without_patient_or_people_still_valid(export: Path) -> None:
    bare = RecordingMeta("rec-2", "cons-2", START, START + timedelta(minutes=1))
    bundle = recording_bundle(bare, url=URL, export_path=export, now=NOW)
    Bundle.model_validate(bundle)
    doc = bundle["entry"][0]["resource"]
    assert "subject" not in doc and "author" not in doc


def test_a_broken_resource_fails_validation(meta: RecordingMeta, export: Path) -> None:
    """The validator really validates: the test above can fail."""
    doc = document_reference(meta, url=URL, export_path=export, now=NOW)
    without_content = {k: v for k, v in doc.items() if k != "content"}
    with pytest.raises(ValueError, match="content"):
        DocumentReference.model_validate(without_content)
    with pytest.raises(ValueError, match="date"):
        DocumentReference.model_validate({**doc, "date": "2025-09-01T10:00"})  # no zone


def test_meta_from_a_sealed_manifest(tmp_path: Path, export: Path) -> None:
    clock = iter(START + timedelta(minutes=n) for n in range(10))
    with Manifest(tmp_path, clock=lambda: next(clock)) as manifest:
        manifest.recording_started(
            recording_id="rec-3", room="r", consultation_id="cons-3", patient_ref="Patient/p-3"
        )
        manifest.participant("u1", name="Dr A", clinic="Regional", tier="lan", role="chair")
        manifest.participant("u2", name="F B", clinic="Village", tier="3g", role="feldsher")
        manifest.recording_stopped()
        sealed = manifest.seal(Ed25519PrivateKey.generate())
    meta = meta_from_manifest(read_entries(tmp_path))
    assert meta.patient_ref == "Patient/p-3"
    assert [a.display for a in meta.authors] == ["Dr A"]
    assert meta.ended_at - meta.started_at == timedelta(minutes=3)
    assert meta.manifest_hash == sealed["data"]["signed_hash"]
    Bundle.model_validate(recording_bundle(meta, url=URL, export_path=export, now=NOW))
