"""RoomSettings: what an integrating system configures for a room before it meets.

Set with ``PUT /api/rooms/{room}`` (admin API key) and kept in the Store's room
record, so every node sees the same:

* ``consent_required`` — recording waits for everyone's consent (default false);
* ``auto_record`` — recording starts when the first participant joins;
* ``retention_days`` — how long this room's recordings are kept (overrides the
  server's ``retention_days``; 0 keeps them forever);
* ``patient_ref`` — a FHIR reference to the patient (``Patient/123``); it
  becomes the subject of the recordings' DocumentReference;
* ``consultation_id`` — the consultation (encounter) identifier of the records.

Validation names the field that is wrong; unknown fields are refused so a typo
is not silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import BadRequest
from .protocol import CONSULTATION_ID_RE, PATIENT_REF_RE

MAX_RETENTION_DAYS = 36_500
MAX_TITLE = 200


@dataclass(frozen=True, slots=True)
class RoomSettings:
    consent_required: bool = False
    auto_record: bool = False
    retention_days: int | None = None
    patient_ref: str | None = None
    consultation_id: str | None = None

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, settings: Mapping[str, object]) -> RoomSettings:
        """From a stored record, tolerating old or foreign fields (never raises)."""
        try:
            return parse_room_settings(
                {k: v for k, v in settings.items() if k in _FIELDS}, field="settings"
            )
        except BadRequest:
            return cls()


_FIELDS = frozenset(RoomSettings.__dataclass_fields__)


def parse_room_settings(body: object, field: str = "settings") -> RoomSettings:
    """Validate a ``settings`` object from a request."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"'{field}' must be an object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise BadRequest(f"'{field}' has unknown fields: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for name in ("consent_required", "auto_record"):
        if name in body:
            if not isinstance(body[name], bool):
                raise BadRequest(f"'{field}.{name}' must be true or false")
            out[name] = body[name]
    days = body.get("retention_days")
    if days is not None:
        if isinstance(days, bool) or not isinstance(days, int):
            raise BadRequest(f"'{field}.retention_days' must be a whole number of days")
        if not 0 <= days <= MAX_RETENTION_DAYS:
            raise BadRequest(f"'{field}.retention_days' must be 0..{MAX_RETENTION_DAYS}")
        out["retention_days"] = days
    ref = body.get("patient_ref")
    if ref is not None:
        if not isinstance(ref, str) or not PATIENT_REF_RE.match(ref):
            raise BadRequest(f"'{field}.patient_ref' must be a FHIR reference like Patient/123")
        out["patient_ref"] = ref
    cid = body.get("consultation_id")
    if cid is not None:
        if not isinstance(cid, str) or not CONSULTATION_ID_RE.match(cid):
            raise BadRequest(f"'{field}.consultation_id' must be 1..128 letters, digits or _.:/-")
        out["consultation_id"] = cid
    return RoomSettings(**out)


def parse_title(value: object, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TITLE or not value.isprintable():
        raise BadRequest(f"'title' must be text of 1..{MAX_TITLE} characters")
    return value
