"""The Store contract, run against MemoryStore and RedisStore alike."""

from __future__ import annotations

import asyncio
import math

import pytest

from signalling.store import (
    AUDIT_CAP,
    AuditEvent,
    MemoryStore,
    ParticipantRecord,
    RoomRecord,
    Store,
    StoreError,
    UnknownRoom,
)
from signalling.store_factory import open_store
from signalling.store_redis import RedisStore
from tests.contract.conftest import StoreMaker
from tests.services import RedisServer, free_port

T0 = 1_732_370_000.123456


def room(room_id: str = "r1", *, created_at: float = T0, **settings: object) -> RoomRecord:
    return RoomRecord(
        id=room_id, title=f"Консилиум {room_id}", created_at=created_at, settings=settings
    )


def participant(
    pid: str = "p1",
    *,
    room_id: str = "r1",
    joined_at: float = T0,
    name: str = "Иванова А. П.",
    state: str = "active",
) -> ParticipantRecord:
    return ParticipantRecord(
        room_id=room_id,
        participant_id=pid,
        name=name,
        clinic="ФАП с. Верхний Ульхун",
        tier="weak",
        role="feldsher",
        node_id="node-a",
        joined_at=joined_at,
        state=state,
    )


def event(n: int, action: str = "room.join", **detail: object) -> AuditEvent:
    return AuditEvent(
        at=T0 + n,
        actor=f"user-{n}",
        action=action,
        target="r1",
        outcome="ok",
        detail={"n": n, **detail},
    )


# --- rooms ---------------------------------------------------------------------------


async def test_store_satisfies_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


async def test_created_room_reads_back_equal(store: Store) -> None:
    r = room("r1", max_participants=12)
    assert await store.create_room(r) is True
    assert await store.get_room("r1") == r
    assert await store.get_room("nope") is None


async def test_creating_a_room_twice_returns_false_and_keeps_the_first(store: Store) -> None:
    first = room("r1", recording=True)
    assert await store.create_room(first) is True
    assert await store.create_room(room("r1", recording=False)) is False
    assert await store.get_room("r1") == first
    assert await store.list_rooms() == [first]


async def test_put_room_replaces_settings_and_creates_when_missing(store: Store) -> None:
    await store.put_room(room("r1", consent_required=True))
    assert (await store.get_room("r1")) == room("r1", consent_required=True)
    changed = room("r1", consent_required=False, retention_days=30)
    await store.put_room(changed)
    assert await store.get_room("r1") == changed
    assert await store.list_rooms() == [changed]
    assert await store.create_room(room("r1")) is False  # it exists


async def test_concurrent_creates_of_one_room_let_exactly_one_win(store: Store) -> None:
    results = await asyncio.gather(*(store.create_room(room("r1", n=n)) for n in range(20)))
    assert sorted(results) == [False] * 19 + [True]
    stored = await store.get_room("r1")
    assert stored is not None
    assert stored.settings["n"] == results.index(True)


async def test_list_rooms_is_oldest_first(store: Store) -> None:
    assert await store.list_rooms() == []
    b = room("b", created_at=T0 + 2)
    a = room("a", created_at=T0 + 1)
    c2 = room("c2", created_at=T0 + 3)
    c1 = room("c1", created_at=T0 + 3)
    for r in (b, c2, a, c1):
        assert await store.create_room(r)
    assert await store.list_rooms() == [a, b, c1, c2]


async def test_deleted_room_is_gone(store: Store) -> None:
    await store.create_room(room("r1"))
    await store.create_room(room("r2"))
    assert await store.delete_room("r1") is True
    assert await store.get_room("r1") is None
    assert [r.id for r in await store.list_rooms()] == ["r2"]
    assert await store.delete_room("r1") is False
    assert await store.delete_room("never") is False


async def test_deleting_a_room_drops_its_participants_only(store: Store) -> None:
    await store.create_room(room("r1"))
    await store.create_room(room("r2"))
    await store.upsert_participant(participant("p1", room_id="r1"))
    await store.upsert_participant(participant("p2", room_id="r1"))
    other = participant("p1", room_id="r2")
    await store.upsert_participant(other)
    assert await store.delete_room("r1") is True
    assert await store.list_participants("r1") == []
    assert await store.get_participant("r1", "p1") is None
    assert await store.list_participants("r2") == [other]
    # A new room with the same id starts empty.
    assert await store.create_room(room("r1"))
    assert await store.list_participants("r1") == []


async def test_a_second_handle_sees_the_same_state(make_store: StoreMaker) -> None:
    node_a = await make_store()
    node_b = await make_store()
    assert await node_a.create_room(room("r1"))
    assert await node_b.create_room(room("r1")) is False
    await node_b.upsert_participant(participant("p1"))
    assert await node_a.list_participants("r1") == [participant("p1")]
    await node_a.append_audit(event(1))
    assert await node_b.list_audit() == [event(1)]


# --- participants ----------------------------------------------------------------------


async def test_participant_reads_back_equal(store: Store) -> None:
    await store.create_room(room("r1"))
    p = participant("p1")
    await store.upsert_participant(p)
    assert await store.get_participant("r1", "p1") == p
    assert await store.get_participant("r1", "p2") is None
    assert await store.get_participant("r2", "p1") is None
    assert await store.list_participants("r1") == [p]


async def test_upsert_replaces_the_participant(store: Store) -> None:
    await store.create_room(room("r1"))
    await store.upsert_participant(participant("p1", name="Петров"))
    moved = participant("p1", name="Петров И. И.", joined_at=T0 + 5)
    await store.upsert_participant(moved)
    assert await store.get_participant("r1", "p1") == moved
    assert await store.list_participants("r1") == [moved]


async def test_participant_state_change_is_stored(store: Store) -> None:
    await store.create_room(room("r1"))
    await store.upsert_participant(participant("p1"))
    await store.upsert_participant(participant("p1", state="reconnecting"))
    got = await store.get_participant("r1", "p1")
    assert got is not None and got.state == "reconnecting"
    await store.upsert_participant(participant("p1", state="active"))
    got = await store.get_participant("r1", "p1")
    assert got is not None and got.state == "active"


async def test_removed_participant_is_gone(store: Store) -> None:
    await store.create_room(room("r1"))
    await store.upsert_participant(participant("p1"))
    await store.upsert_participant(participant("p2", joined_at=T0 + 1))
    assert await store.remove_participant("r1", "p1") is True
    assert await store.get_participant("r1", "p1") is None
    assert [p.participant_id for p in await store.list_participants("r1")] == ["p2"]
    assert await store.remove_participant("r1", "p1") is False
    assert await store.remove_participant("nope", "p2") is False
    assert await store.get_room("r1") is not None


async def test_participants_are_listed_by_join_time(store: Store) -> None:
    await store.create_room(room("r1"))
    order = [("late", 30.0), ("first", 1.0), ("mid-b", 20.0), ("mid-a", 20.0), ("early", 2.5)]
    for pid, offset in order:
        await store.upsert_participant(participant(pid, joined_at=T0 + offset))
    got = [p.participant_id for p in await store.list_participants("r1")]
    assert got == ["first", "early", "mid-a", "mid-b", "late"]


async def test_participants_belong_to_their_room(store: Store) -> None:
    await store.create_room(room("r1"))
    await store.create_room(room("r2"))
    await store.upsert_participant(participant("p1", room_id="r1"))
    await store.upsert_participant(participant("p2", room_id="r2"))
    assert [p.participant_id for p in await store.list_participants("r1")] == ["p1"]
    assert [p.participant_id for p in await store.list_participants("r2")] == ["p2"]
    assert await store.list_participants("unknown") == []


async def test_participant_of_an_unknown_room_is_refused(store: Store) -> None:
    with pytest.raises(UnknownRoom):
        await store.upsert_participant(participant("p1", room_id="ghost"))
    assert await store.list_participants("ghost") == []
    assert await store.get_room("ghost") is None
    assert issubclass(UnknownRoom, StoreError)


def test_participant_state_must_be_known() -> None:
    with pytest.raises(ValueError, match="state"):
        participant("p1", state="gone")


# --- audit --------------------------------------------------------------------------


async def test_audit_lists_newest_first(store: Store) -> None:
    assert await store.list_audit() == []
    for n in range(5):
        await store.append_audit(event(n))
    assert await store.list_audit() == [event(n) for n in (4, 3, 2, 1, 0)]


async def test_audit_limit(store: Store) -> None:
    for n in range(10):
        await store.append_audit(event(n))
    assert await store.list_audit(limit=3) == [event(9), event(8), event(7)]
    assert await store.list_audit(limit=1) == [event(9)]
    assert await store.list_audit(limit=0) == []
    assert len(await store.list_audit(limit=1000)) == 10
    with pytest.raises(ValueError):
        await store.list_audit(limit=-1)


async def test_audit_default_limit_is_100(store: Store) -> None:
    for n in range(105):
        await store.append_audit(event(n))
    got = await store.list_audit()
    assert len(got) == 100
    assert got[0] == event(104) and got[-1] == event(5)


async def test_audit_filter_by_action(store: Store) -> None:
    actions = ["room.join", "recording.start", "room.join", "doc.view", "room.join"]
    for n, action in enumerate(actions):
        await store.append_audit(event(n, action))
    assert await store.list_audit(action="room.join") == [
        event(4, "room.join"),
        event(2, "room.join"),
        event(0, "room.join"),
    ]
    assert await store.list_audit(limit=2, action="room.join") == [
        event(4, "room.join"),
        event(2, "room.join"),
    ]
    assert await store.list_audit(action="doc.view") == [event(3, "doc.view")]
    assert await store.list_audit(action="room.leave") == []
    assert await store.list_audit(limit=0, action="room.join") == []


async def test_audit_keeps_only_the_newest_entries(make_store: StoreMaker) -> None:
    store = await make_store(audit_cap=5)
    for n in range(8):
        await store.append_audit(event(n, "odd" if n % 2 else "even"))
    assert await store.list_audit() == [
        event(n, "odd" if n % 2 else "even") for n in (7, 6, 5, 4, 3)
    ]
    # Filtered queries see only what the whole log still keeps.
    assert await store.list_audit(action="even") == [event(6, "even"), event(4, "even")]
    assert await store.list_audit(action="odd") == [
        event(7, "odd"),
        event(5, "odd"),
        event(3, "odd"),
    ]


def test_audit_cap_is_one_hundred_thousand() -> None:
    assert AUDIT_CAP == 100_000


# --- values ---------------------------------------------------------------------------


async def test_values_round_trip_exactly(store: Store) -> None:
    settings: dict[str, object] = {
        "язык": "ru",
        "layout": {"grid": [2, 3], "pinned": ["Иванова А. П.", None], "zoom": 1.25},
        "recording": {"enabled": True, "retention_days": 365, "ratio": 0.1 + 0.2},
        "empty": {},
        "emoji": "🩺",
        "big": 2**53 + 1,
        "negative": -7,
        "float_one": 1.0,
    }
    r = RoomRecord(
        id="консилиум-1", title="Кардиология: разбор «случая» №7", created_at=T0, settings=settings
    )
    assert await store.create_room(r)
    got = await store.get_room("консилиум-1")
    assert got == r
    assert got is not None
    assert got.created_at == T0
    assert isinstance(got.settings["float_one"], float)
    assert isinstance(got.settings["big"], int) and got.settings["big"] == 2**53 + 1
    layout = got.settings["layout"]
    assert isinstance(layout, dict) and isinstance(layout["grid"], list)

    p = participant("участник-1", room_id="консилиум-1", name="Иванова А. П.")
    await store.upsert_participant(p)
    assert await store.list_participants("консилиум-1") == [p]

    e = AuditEvent(
        at=T0,
        actor="Иванова А. П.",
        action="документ.просмотр",
        target="консилиум-1",
        outcome="ok",
        detail={"file": "анализы.pdf", "sha256": "ab" * 32, "pages": [1, 2], "ok": False},
    )
    await store.append_audit(e)
    assert await store.list_audit(action="документ.просмотр") == [e]


async def test_tuples_come_back_as_lists(store: Store) -> None:
    await store.create_room(room("r1", grid=(2, 3)))
    got = await store.get_room("r1")
    assert got is not None and got.settings["grid"] == [2, 3]


@pytest.mark.parametrize(
    "bad",
    [{1, 2}, object(), math.nan, math.inf, {1: "int key"}, {"nested": {2: "int key"}}],
    ids=["set", "object", "nan", "inf", "int-key", "nested-int-key"],
)
async def test_non_json_values_are_refused_and_not_stored(store: Store, bad: object) -> None:
    with pytest.raises(StoreError):
        await store.create_room(room("r1", bad=bad))
    assert await store.get_room("r1") is None
    with pytest.raises(StoreError):
        await store.append_audit(event(1, bad=bad))
    assert await store.list_audit() == []


# --- lifecycle ------------------------------------------------------------------------


async def test_close_twice_and_calls_after_close_fail(store: Store) -> None:
    await store.create_room(room("r1"))
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get_room("r1")
    with pytest.raises(StoreError, match="closed"):
        await store.append_audit(event(1))


async def test_open_store_without_url_is_memory() -> None:
    store = await open_store(None)
    try:
        assert isinstance(store, MemoryStore)
        assert await store.create_room(room("r1"))
    finally:
        await store.close()
    assert isinstance(await open_store(""), MemoryStore)


@pytest.mark.redis
async def test_open_store_with_url_is_redis(redis_server: RedisServer) -> None:
    store = await open_store(redis_server.url, prefix="test-factory:")
    try:
        assert isinstance(store, RedisStore)
        assert await store.list_rooms() == []
    finally:
        await store.close()
        await store.close()


async def test_unreachable_redis_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot reach redis"):
        await open_store(f"redis://:secret@127.0.0.1:{free_port()}/0")


async def test_unreachable_redis_error_hides_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        await open_store(f"redis://user:secret@127.0.0.1:{free_port()}/0")
    assert "secret" not in str(caught.value)
