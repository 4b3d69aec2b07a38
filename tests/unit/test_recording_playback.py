"""Playback: the page's view of a manifest, and the per-track playable copies."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import av
import pytest

from recording.manifest import Manifest
from recording.playback import PlaybackError, build_track_copy, playback_view, track_copy_path
from recording.storage import read_entries
from tests.media import solid_vp8, tone_opus, write_track

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def make(directory: Path) -> Path:
    with Manifest(directory, clock=lambda: START) as manifest:
        manifest.recording_started(recording_id="rec-p", room="r", consultation_id="c")
        manifest.participant("a", name="Анна", clinic="ЦРБ", tier="district", role="chair")
        manifest.participant("b", name="Борис", clinic="ФАП", tier="district", role="consultant")
        manifest.consent("a", granted=True)
        manifest.consent("b", granted=False)
        write_track(manifest, directory, "a", "video", solid_vp8((200, 0, 0), 5.0), offset=0.5)
        write_track(manifest, directory, "b", "audio", tone_opus(400, 0.2, 3.0), offset=1.0)
        manifest.event("mute", {"offset_s": 1.5, "source": "camera"}, participant_id="a")
        manifest.event("leave", {"offset_s": 4.0, "reason": "left"}, participant_id="b")
        manifest.event("chat", {"offset_s": 4.5, "text": "x"}, participant_id="a")
        manifest.append("recording_stopped", {"reason": "stopped"}, at=START + timedelta(seconds=5))
    return directory


def test_view_lists_people_tracks_and_a_timeline_in_session_order(tmp_path: Path) -> None:
    view = playback_view("rec-p", read_entries(make(tmp_path), None))
    assert [(p.name, p.consent) for p in view.people] == [
        ("Анна", "granted"),
        ("Борис", "declined"),
    ]
    assert {(t.track_id, t.kind, t.offset_s, t.segments) for t in view.tracks} == {
        ("a.camera", "video", 0.5, 3),
        ("b.microphone", "audio", 1.0, 2),
    }
    kinds = [(m.kind, m.participant_id, m.detail) for m in view.timeline]
    assert kinds[0] == ("recording_started", None, "")
    assert ("mute", "a", "camera") in kinds and ("leave", "b", "left") in kinds
    assert ("consent_declined", "b", "") in kinds and kinds[-1][0] == "recording_stopped"
    assert "chat" not in [k for k, _, _ in kinds]  # chat text is not on the timeline
    offsets = [m.offset_s for m in view.timeline]
    assert offsets == sorted(offsets)
    assert view.room == "r" and not view.sealed and view.name_of("b") == "Борис"


def test_track_copy_concatenates_segments_and_leaves_out_an_altered_one(tmp_path: Path) -> None:
    directory = make(tmp_path)
    path = build_track_copy(directory, "a.camera", None)
    assert path == track_copy_path(directory, "a.camera")
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 75  # 5 s at 15 fps, 3 segments
    path.unlink()
    middle = directory / "tracks" / "a.camera" / "000001.webm"
    raw = bytearray(middle.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    middle.write_bytes(bytes(raw))
    with av.open(io.BytesIO(build_track_copy(directory, "a.camera", None).read_bytes())) as c:
        assert 0 < sum(1 for _ in c.decode(video=0)) < 75
    with pytest.raises(PlaybackError):
        build_track_copy(directory, "nobody.camera", None)
