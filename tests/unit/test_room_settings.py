"""Room settings: validation names the field; stored records are read leniently."""

from __future__ import annotations

import pytest

from signalling.errors import BadRequest
from signalling.room_settings import RoomSettings, parse_room_settings, parse_title


def test_all_fields_round_trip() -> None:
    body = {
        "consent_required": True,
        "auto_record": True,
        "retention_days": 30,
        "patient_ref": "Patient/42",
        "consultation_id": "cons-7",
    }
    settings = parse_room_settings(body)
    assert settings.to_json() == body
    assert RoomSettings.from_record(settings.to_json()) == settings


def test_defaults_leave_out_what_is_unset() -> None:
    assert parse_room_settings({}).to_json() == {"consent_required": False, "auto_record": False}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"auto_record": "yes"}, "auto_record"),
        ({"consent_required": 1}, "consent_required"),
        ({"retention_days": -1}, "retention_days"),
        ({"retention_days": True}, "retention_days"),
        ({"retention_days": 2.5}, "retention_days"),
        ({"patient_ref": "42"}, "patient_ref"),
        ({"patient_ref": "Patient/../../etc"}, "patient_ref"),
        ({"consultation_id": ""}, "consultation_id"),
        ({"consultation_id": "a b"}, "consultation_id"),
        ({"retention": 3}, "retention"),
    ],
)
def test_bad_values_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_room_settings(body)
    assert field in exc.value.message


def test_not_an_object() -> None:
    with pytest.raises(BadRequest):
        parse_room_settings(["auto_record"])


def test_a_stored_record_with_foreign_or_broken_fields_reads_as_defaults_or_known_ones() -> None:
    assert RoomSettings.from_record({"legacy": 1, "consent_required": True}).consent_required
    assert RoomSettings.from_record({"retention_days": "soon"}) == RoomSettings()


def test_title() -> None:
    assert parse_title(None, "room-1") == "room-1"
    assert parse_title("Консилиум", "room-1") == "Консилиум"
    with pytest.raises(BadRequest):
        parse_title("", "room-1")
    with pytest.raises(BadRequest):
        parse_title("x\n", "room-1")
