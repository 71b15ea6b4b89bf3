"""Groups and members, call artifacts and embedding vectors."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.errors import GroupExistsError, GroupNotFoundError
from study_query_llm.db.records import NewCall


@pytest.fixture
def call_ids(engine: Engine, make_call: Callable[..., NewCall]) -> list[int]:
    with UnitOfWork(engine) as uow:
        ids = uow.calls.add_many([make_call(prompt=f"call {i}") for i in range(6)])
        uow.commit()
    return ids


def test_groups_are_unique_by_type_and_name(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        group = uow.groups.create("experiment", "e1", description="first", metadata={"k": 1})
        uow.groups.create("batch", "e1")  # same name, other type: fine
        with pytest.raises(GroupExistsError):
            uow.groups.create("experiment", "e1")
        uow.commit()
    with UnitOfWork(engine) as uow, pytest.raises(IntegrityError):
        uow.session.execute(
            text("INSERT INTO groups (group_type, name, created_at) VALUES (:t, :n, :c)"),
            {"t": "experiment", "n": "e1", "c": "2024-01-01 00:00:00"},
        )
    with UnitOfWork(engine) as uow:
        found = uow.groups.find("experiment", "e1")
        assert found is not None and found.id == group.id
        assert (found.description, found.metadata_json) == ("first", {"k": 1})
        assert uow.groups.find("experiment", "missing") is None
        assert [g.group_type for g in uow.groups.list_groups()] == ["batch", "experiment"]
        assert [g.name for g in uow.groups.list_groups("batch")] == ["e1"]


def test_get_or_create_returns_the_same_group(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        first = uow.groups.get_or_create("sweep", "s1", description="made once")
        again = uow.groups.get_or_create("sweep", "s1", description="ignored")
        uow.commit()
    with UnitOfWork(engine) as uow:
        third = uow.groups.get_or_create("sweep", "s1")
        assert first.id == again.id == third.id
        assert third.description == "made once"
        assert len(uow.groups.list_groups("sweep")) == 1


def test_members_keep_their_order(engine: Engine, call_ids: list[int]) -> None:
    a, b, c, d, e, f = call_ids
    with UnitOfWork(engine) as uow:
        group = uow.groups.create("conversation", "chat")
        first = uow.groups.add_members(group.id, [c, a, b], role="turn")
        assert [m.position for m in first] == [0, 1, 2]
        second = uow.groups.add_members(group.id, [a, f, f, d])  # a is already in
        assert [(m.call_id, m.position) for m in second] == [(f, 3), (d, 4)]
        assert uow.groups.add_members(group.id, []) == []
        uow.commit()
    with UnitOfWork(engine) as uow:
        assert uow.groups.member_call_ids(group.id) == [c, a, b, f, d]
        members = uow.groups.members(group.id)
        assert [m.role for m in members] == ["turn", "turn", "turn", None, None]
        assert uow.groups.remove_member(group.id, a) is True
        assert uow.groups.remove_member(group.id, a) is False
        uow.groups.add_members(group.id, [e])
        assert uow.groups.member_call_ids(group.id) == [c, b, f, d, e]
        assert [m.position for m in uow.groups.members(group.id)] == [0, 2, 3, 4, 5]
        assert [g.name for g in uow.groups.groups_of_call(c)] == ["chat"]


def test_members_must_be_recorded_calls(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        group = uow.groups.create("label", "bad")
        with pytest.raises(IntegrityError):
            uow.groups.add_members(group.id, [999_999])
    with UnitOfWork(engine) as uow, pytest.raises(GroupNotFoundError):
        uow.groups.add_members(424242, [1])


def test_rename_describe_and_delete(engine: Engine, call_ids: list[int]) -> None:
    with UnitOfWork(engine) as uow:
        group = uow.groups.create("experiment", "old", description="d", metadata={"a": 1})
        uow.groups.create("experiment", "taken")
        uow.groups.add_members(group.id, call_ids[:2])
        uow.groups.rename(group.id, "new")
        with pytest.raises(GroupExistsError):
            uow.groups.rename(group.id, "taken")
        uow.groups.describe(group.id, description="described")
        uow.groups.describe(group.id, metadata={"b": 2})
        uow.commit()
    with UnitOfWork(engine) as uow:
        renamed = uow.groups.get(group.id)
        assert (renamed.name, renamed.description, renamed.metadata_json) == (
            "new",
            "described",
            {"b": 2},
        )
        assert uow.groups.find("experiment", "old") is None
        uow.groups.delete(group.id)
        uow.commit()
    with UnitOfWork(engine) as uow:
        assert uow.groups.get(group.id) is None
        assert uow.groups.members(group.id) == []
        assert uow.calls.count() == len(call_ids)  # the calls themselves stay
        with pytest.raises(GroupNotFoundError):
            uow.groups.rename(group.id, "gone")


def test_artifacts_belong_to_calls(engine: Engine, call_ids: list[int]) -> None:
    with UnitOfWork(engine) as uow:
        first = uow.artifacts.add(
            call_ids[0],
            "file:///data/blobs/ab.png",
            content_type="image/png",
            byte_size=5_000_000_000,
            metadata={"sha256": "ab" * 32},
        )
        second = uow.artifacts.add(call_ids[0], "s3://bucket/raw.json")
        uow.commit()
    with UnitOfWork(engine) as uow:
        assert [a.id for a in uow.artifacts.for_call(call_ids[0])] == [first, second]
        stored = uow.artifacts.get(first)
        assert (stored.uri, stored.content_type, stored.byte_size) == (
            "file:///data/blobs/ab.png",
            "image/png",
            5_000_000_000,
        )
        assert stored.metadata_json == {"sha256": "ab" * 32}
        assert uow.artifacts.for_call(call_ids[1]) == []
        with pytest.raises(IntegrityError):
            uow.artifacts.add(999_999, "file:///nowhere")


def test_embedding_vectors_round_trip_with_norm_and_dimension(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    vector = [0.1, -0.2, 0.30000000000000004, 1e-12, 12345.678]
    with UnitOfWork(engine) as uow:
        call_id = uow.calls.add(
            make_call(modality="embedding", request_hash="hash-1", request_json={"input": ["a"]})
        )
        other = uow.calls.add(make_call(modality="embedding", request_hash="hash-2"))
        vector_id = uow.embeddings.add(call_id, "embed-small", vector)
        uow.embeddings.add_many(other, "embed-small", [[1.0, 0.0], [0.0, 2.0]])
        uow.embeddings.add(call_id, "embed-large", [3.0, 4.0])
        uow.commit()
    with UnitOfWork(engine) as uow:
        stored = uow.embeddings.get(vector_id)
        assert stored.vector == vector  # exact floats, whichever storage the column uses
        assert stored.dimension == 5
        assert stored.norm == pytest.approx(math.sqrt(sum(x * x for x in vector)))
        assert uow.embeddings.find("embed-large", call_id).norm == 5.0
        assert uow.embeddings.find("embed-large", other) is None
        assert [v.model for v in uow.embeddings.for_call(call_id)] == [
            "embed-large",
            "embed-small",
        ]
        batch = uow.embeddings.for_call(other, "embed-small")
        assert [(v.input_index, v.vector) for v in batch] == [(0, [1.0, 0.0]), (1, [0.0, 2.0])]
        assert [v.call_id for v in uow.embeddings.for_request_hash("embed-small", "hash-2")] == [
            other,
            other,
        ]
        assert uow.embeddings.for_request_hash("embed-large", "hash-2") == []
        assert len(uow.embeddings.for_model("embed-small")) == 3
        assert len(uow.embeddings.for_model("embed-small", [call_id])) == 1


def test_embedding_vectors_reject_bad_input(engine: Engine, call_ids: list[int]) -> None:
    with UnitOfWork(engine) as uow:
        with pytest.raises(ValueError, match="at least one"):
            uow.embeddings.add(call_ids[0], "m", [])
        with pytest.raises(ValueError, match="NaN"):
            uow.embeddings.add(call_ids[0], "m", [1.0, float("nan")])
        uow.embeddings.add(call_ids[0], "m", [1.0])
        with pytest.raises(IntegrityError):  # one vector per (call, model, input)
            uow.embeddings.add(call_ids[0], "m", [2.0])


def test_members_at_planned_positions_and_roles(engine: Engine, call_ids: list[int]) -> None:
    a, b, c, d, *_ = call_ids
    with UnitOfWork(engine) as uow:
        group = uow.groups.create("sweep", "planned")
        # results arrive out of order; each goes to its planned slot
        assert uow.groups.add_member_at(group.id, c, position=2, role="sample").position == 2
        assert uow.groups.add_member_at(group.id, a, position=0).position == 0
        assert uow.groups.add_member_at(group.id, c, position=7).position == 2  # already in
        assert uow.groups.add_member_at(group.id, d).position == 3  # appended after the last
        assert uow.groups.set_member_role(group.id, a, "superseded") is True
        assert uow.groups.set_member_role(group.id, b, "x") is False  # not a member
        uow.commit()
    with UnitOfWork(engine) as uow:
        members = uow.groups.members(group.id)
    assert [(m.call_id, m.position, m.role) for m in members] == [
        (a, 0, "superseded"),
        (c, 2, "sample"),
        (d, 3, None),
    ]


def test_embedding_cache_lookup_by_request_hash(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        old, new, failed, other_model = uow.calls.add_many(
            [
                make_call(modality="embedding", request_hash="h1"),
                make_call(modality="embedding", request_hash="h1"),
                make_call(modality="embedding", request_hash="h2", status="failed"),
                make_call(modality="embedding", request_hash="h3"),
            ]
        )
        uow.embeddings.add(old, "e", [1.0])
        uow.embeddings.add(new, "e", [2.0])
        uow.embeddings.add(failed, "e", [3.0])
        uow.embeddings.add(other_model, "other", [4.0])
        uow.commit()
    with UnitOfWork(engine) as uow:
        hashes = ["h1", "h2", "h3", "missing", "h1", *(f"x{i}" for i in range(1200))]
        assert uow.embeddings.cached("e", hashes) == {"h1": (new, [2.0])}
        assert uow.embeddings.cached("other", ["h3"]) == {"h3": (other_model, [4.0])}
        assert uow.embeddings.cached("e", []) == {}
