"""RawCallRepository: insert one and many, read back, filter, and page with a keyset."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError

from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.errors import InvalidCursorError
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.pagination import Cursor
from study_query_llm.db.records import NewCall

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def test_add_and_get_round_trip_every_field(engine: Engine) -> None:
    call = NewCall(
        provider="openai",
        model="gpt-4o-mini",
        modality="chat",
        status="failed",
        request_json={
            "messages": [{"role": "user", "content": "Привет 👋 日本語"}],
            "options": {"temperature": 0.2, "max_tokens": 16},
        },
        response_json=None,
        error_json={"type": "RateLimitError", "status": 429, "retry_after": 2.5},
        latency_ms=812.25,
        prompt_tokens=7,
        completion_tokens=None,
        total_tokens=7,
        cost_usd=1.5e-06,
        request_hash="ab" * 32,
        metadata_json={"sample": 0, "nested": {"ok": True, "list": [1, "two", None]}},
        created_at=datetime(2024, 1, 2, 5, 4, 5, 600000, tzinfo=timezone(timedelta(hours=2))),
    )
    with UnitOfWork(engine) as uow:
        call_id = uow.calls.add(call)
        uow.commit()
    with UnitOfWork(engine) as uow:
        stored = uow.calls.get(call_id)
    assert stored is not None
    values = stored.to_dict()
    assert values.pop("id") == call_id
    assert values.pop("created_at") == datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    expected = call.row()
    expected.pop("created_at")
    assert values == expected
    assert stored.created_at.utcoffset() == timedelta(0)


def test_add_accepts_a_dict_and_rejects_bad_values(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        call_id = uow.calls.add(
            {"provider": "mock", "model": "m", "request_json": {"prompt": "hi"}}
        )
        assert uow.calls.get(call_id).status == "success"
        with pytest.raises(ValueError, match="status must be one of"):
            uow.calls.add({"provider": "m", "model": "m", "request_json": {}, "status": "ok"})
        with pytest.raises(TypeError):
            uow.calls.add({"provider": "m", "model": "m", "request_json": {}, "colour": 1})


def test_database_check_constraints_refuse_unknown_status_and_modality(engine: Engine) -> None:
    insert = (
        "INSERT INTO raw_calls (provider, model, modality, status, request_json, created_at) "
        "VALUES ('p', 'm', :modality, :status, '{}', CURRENT_TIMESTAMP)"
    )
    for modality, status in (("chat", "ok"), ("video", "success")):
        with UnitOfWork(engine) as uow, pytest.raises(IntegrityError):
            uow.session.execute(text(insert), {"modality": modality, "status": status})


def test_add_many_is_batched_and_keeps_input_order(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    calls = [make_call(prompt=f"bulk {i}", latency_ms=float(i)) for i in range(5000)]
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO RAW_CALLS"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with UnitOfWork(engine) as uow:
            ids = uow.calls.add_many(calls)
            uow.commit()
    finally:
        event.remove(engine, "before_cursor_execute", count)

    assert len(ids) == len(set(ids)) == 5000
    assert len(statements) <= 10  # a few multi-row statements, not one per row
    with UnitOfWork(engine) as uow:
        assert uow.calls.count() == 5000
        stored = uow.calls.get_many([ids[0], ids[4321], ids[-1]])
    assert [c.latency_ms for c in stored] == [0.0, 4321.0, 4999.0]
    assert uow.calls.add_many([]) == []


def test_uncommitted_calls_are_rolled_back(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        uow.calls.add_many([make_call(), make_call()])
    with pytest.raises(RuntimeError), UnitOfWork(engine) as uow:
        uow.calls.add(make_call())
        raise RuntimeError("boom")
    with UnitOfWork(engine) as uow:
        assert uow.calls.count() == 0


def _seed_for_filters(engine: Engine, make_call: Callable[..., NewCall]) -> dict[str, int]:
    with UnitOfWork(engine) as uow:
        ids = dict(
            zip(
                ["a", "b", "c", "d", "e"],
                uow.calls.add_many(
                    [
                        make_call(provider="openai", model="gpt", created_at=T0),
                        make_call(
                            provider="openai",
                            model="gpt-mini",
                            status="failed",
                            created_at=T0 + timedelta(hours=1),
                        ),
                        make_call(
                            provider="anthropic",
                            model="claude",
                            status="timeout",
                            created_at=T0 + timedelta(hours=2),
                        ),
                        make_call(
                            provider="anthropic",
                            model="claude",
                            modality="embedding",
                            created_at=T0 + timedelta(days=1),
                        ),
                        make_call(provider="mock", model="gpt", created_at=T0 - timedelta(1)),
                    ]
                ),
                strict=True,
            )
        )
        group = uow.groups.create("experiment", "filters")
        uow.groups.add_members(group.id, [ids["b"], ids["d"]])
        ids["group"] = group.id
        uow.commit()
    return ids


def test_every_filter_restricts_the_rows(engine: Engine, make_call: Callable[..., NewCall]) -> None:
    ids = _seed_for_filters(engine, make_call)
    cases: list[tuple[CallFilters, set[str]]] = [
        (CallFilters(), {"a", "b", "c", "d", "e"}),
        (CallFilters(providers=("openai",)), {"a", "b"}),
        (CallFilters(providers=["openai", "mock"]), {"a", "b", "e"}),
        (CallFilters(models=("gpt",)), {"a", "e"}),
        (CallFilters(modality="embedding"), {"d"}),
        (CallFilters(status="timeout"), {"c"}),
        (CallFilters(group_id=ids["group"]), {"b", "d"}),
        # start is inclusive, end exclusive; naive datetimes are UTC
        (CallFilters(start=T0, end=T0 + timedelta(hours=2)), {"a", "b"}),
        (CallFilters(start=T0.replace(tzinfo=None) + timedelta(hours=2)), {"c", "d"}),
        (
            CallFilters(start=T0.astimezone(timezone(timedelta(hours=-5))), providers=("openai",)),
            {"a", "b"},
        ),
        (CallFilters(providers=("openai",), status="failed", group_id=ids["group"]), {"b"}),
        (CallFilters(providers=("nobody",)), set()),
    ]
    with UnitOfWork(engine) as uow:
        for filters, expected in cases:
            got = {r.id for r in uow.calls.query(filters, limit=100).rows}
            assert got == {ids[k] for k in expected}, filters
            assert uow.calls.count(filters) == len(expected)


def test_keyset_pages_never_skip_or_repeat_rows_with_equal_timestamps(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    # 5 distinct timestamps, 41 rows each, inserted in an interleaved order.
    stamps = [T0 + timedelta(seconds=s) for s in (0, 0.000001, 1, 60, 3600)]
    calls = [make_call(created_at=stamps[i % 5], provider=f"p{i % 2}") for i in range(205)]
    with UnitOfWork(engine) as uow:
        uow.calls.add_many(calls)
        uow.commit()

    for filters, expected_count in ((CallFilters(), 205), (CallFilters(providers=("p1",)), 102)):
        seen: list[tuple[datetime, int]] = []
        after: Cursor | str | None = None
        pages = 0
        with UnitOfWork(engine) as uow:
            while True:
                page = uow.calls.query(filters, limit=17, after=after)
                pages += 1
                seen += [(r.created_at, r.id) for r in page.rows]
                if page.next_cursor is None:
                    break
                # alternate between the cursor object and its opaque token
                after = page.next_cursor.encode() if pages % 2 else page.next_cursor
        assert len(seen) == len(set(seen)) == expected_count
        assert seen == sorted(seen, reverse=True)
        assert pages == -(-expected_count // 17)


def test_query_rejects_bad_cursor_and_limit(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        with pytest.raises(InvalidCursorError):
            uow.calls.query(after="not-a-cursor")
        with pytest.raises(ValueError, match="limit"):
            uow.calls.query(limit=0)


def test_find_by_request_hash_returns_the_newest_successful_call(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        old, new, failed, _other = uow.calls.add_many(
            [
                make_call(request_hash="h1", created_at=T0),
                make_call(request_hash="h1", created_at=T0 + timedelta(1)),
                make_call(request_hash="h1", status="failed", created_at=T0 + timedelta(2)),
                make_call(request_hash="h2", model="other", created_at=T0 + timedelta(3)),
            ]
        )
        uow.commit()
    with UnitOfWork(engine) as uow:
        assert uow.calls.find_by_request_hash("h1").id == new
        assert uow.calls.find_by_request_hash("h1", status=None).id == failed
        assert uow.calls.find_by_request_hash("h1", model="other") is None
        assert uow.calls.find_by_request_hash("missing") is None
    assert old < new
