"""Plain values of the storage layer: filters, cursors, input records, URLs, column types."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from study_query_llm.db.column_types import UTCDateTime, VectorType
from study_query_llm.db.connection import is_transient_error, normalize_url
from study_query_llm.db.errors import InvalidCursorError
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.pagination import Cursor
from study_query_llm.db.records import NewCall, NewRun

PLUS_2 = timezone(timedelta(hours=2))


def test_call_filters_are_hashable_and_normalised() -> None:
    filters = CallFilters(
        providers=["openai", "anthropic"],  # type: ignore[arg-type]
        models="gpt",  # type: ignore[arg-type]
        start=datetime(2024, 1, 1, 2, 0, tzinfo=PLUS_2),
        end=datetime(2024, 1, 2),
    )
    assert filters.providers == ("openai", "anthropic")
    assert filters.models == ("gpt",)
    assert filters.start == datetime(2024, 1, 1, tzinfo=UTC)
    assert filters.end == datetime(2024, 1, 2, tzinfo=UTC)
    assert hash(filters) == hash(CallFilters(**vars(filters)))
    assert len(CallFilters().conditions()) == 0
    assert len(filters.conditions()) == 4
    assert len(CallFilters(modality="chat", status="failed", group_id=3).conditions()) == 3


def test_cursor_tokens_round_trip_and_reject_garbage() -> None:
    cursor = Cursor(datetime(2024, 5, 1, 12, 30, 0, 123456, tzinfo=UTC), 42)
    assert Cursor.decode(cursor.encode()) == cursor
    assert Cursor.coerce(cursor.encode()) == cursor
    assert Cursor.coerce(None) is None
    for token in ("", "!!!", "bm90IGpzb24", "WyJ4IiwgMV0", "WyIyMDI0LTAxLTAxIiwgIjEiXQ"):
        with pytest.raises(InvalidCursorError):
            Cursor.decode(token)


def test_new_call_validates_and_fills_created_at() -> None:
    call = NewCall.coerce({"provider": "p", "model": "m", "request_json": {"prompt": "x"}})
    row = call.row()
    assert row["status"] == "success" and row["modality"] == "chat"
    assert row["created_at"].tzinfo is not None
    aware = NewCall(
        provider="p", model="m", request_json={}, created_at=datetime(2024, 1, 1, 2, tzinfo=PLUS_2)
    )
    assert aware.row()["created_at"] == datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="modality"):
        NewCall(provider="p", model="m", request_json={}, modality="audio")
    with pytest.raises(TypeError, match="request_json"):
        NewCall(provider="p", model="m", request_json="prompt")  # type: ignore[arg-type]


def test_a_dict_goes_straight_to_the_row_a_new_call_would_make() -> None:
    plain = {"provider": "p", "model": "m", "request_json": {"prompt": "x"}}
    full = {
        **plain,
        "status": "failed",
        "modality": "embedding",
        "error_json": {"type": "timeout"},
        "latency_ms": 12.5,
        "request_hash": "h",
        "metadata_json": {"attempt": 2},
        "created_at": datetime(2024, 1, 1, 2, tzinfo=PLUS_2),
    }
    for fields in (full, {**full, "created_at": datetime(2024, 1, 1)}):
        assert NewCall.row_of(fields) == NewCall(**fields).row()
    row = NewCall.row_of(plain)
    assert row["created_at"].tzinfo is not None and row["status"] == "success"
    assert row == {**NewCall(**plain).row(), "created_at": row["created_at"]}
    record = NewCall(**plain)
    assert NewCall.row_of(record)["request_json"] is record.request_json
    # Refused exactly as the record itself refuses them.
    for bad, error, match in [
        ({"provider": "p", "model": "m"}, TypeError, "request_json"),
        ({**plain, "colour": "red"}, TypeError, "colour"),
        ({**plain, "status": "fine"}, ValueError, "status"),
        ({**plain, "modality": "audio"}, ValueError, "modality"),
        ({**plain, "request_json": "prompt"}, TypeError, "request_json"),
    ]:
        with pytest.raises(error, match=match):
            NewCall.row_of(bad)


def test_new_run_accepts_the_v1_metadata_key() -> None:
    run = NewRun.coerce({"prompt": "p", "provider": "x", "metadata": {"a": 1}})
    assert run.metadata_json == {"a": 1}


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgres://u:p%40ss@h:5433/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("sqlite:///./data/x.db", "sqlite"),
    ],
)
def test_urls_get_the_psycopg_driver(url: str, driver: str) -> None:
    normalized = normalize_url(url)
    assert normalized.drivername == driver
    if "p%40ss" in url:
        assert normalized.password == "p@ss" and normalized.port == 5433


def test_transient_errors_are_told_apart_from_refusals() -> None:
    def wrap(cls: type[sa_exc.DBAPIError], orig: Exception) -> sa_exc.DBAPIError:
        return cls("stmt", {}, orig)

    assert is_transient_error(wrap(sa_exc.OperationalError, sqlite3.OperationalError("locked")))
    assert is_transient_error(wrap(sa_exc.InterfaceError, Exception("connection closed")))
    assert is_transient_error(sqlite3.OperationalError("database is locked"))
    assert not is_transient_error(wrap(sa_exc.IntegrityError, sqlite3.IntegrityError("unique")))
    assert not is_transient_error(
        wrap(sa_exc.IntegrityError, sqlite3.IntegrityError("raw_calls is append-only: UPDATE"))
    )
    assert not is_transient_error(ValueError("nope"))


def test_psycopg_operational_errors_are_transient() -> None:
    psycopg = pytest.importorskip("psycopg")
    assert is_transient_error(psycopg.OperationalError("server closed the connection"))
    internal = sa_exc.InternalError("stmt", {}, psycopg.errors.RaiseException("append-only"))
    assert not is_transient_error(internal)


def test_utc_datetime_stores_utc_and_reads_aware() -> None:
    column = UTCDateTime()
    lite, pg = sqlite.dialect(), postgresql.dialect()
    aware = datetime(2024, 1, 1, 2, tzinfo=PLUS_2)
    assert column.process_bind_param(aware, lite) == datetime(2024, 1, 1)
    assert column.process_bind_param(aware, pg) == datetime(2024, 1, 1, tzinfo=UTC)
    assert column.process_bind_param(datetime(2024, 1, 1), pg) == datetime(2024, 1, 1, tzinfo=UTC)
    assert column.process_result_value(datetime(2024, 1, 1), lite) == datetime(
        2024, 1, 1, tzinfo=UTC
    )
    assert column.process_result_value(aware, pg) == datetime(2024, 1, 1, tzinfo=UTC)
    assert column.process_bind_param(None, pg) is None


def test_vector_type_sends_floats_and_reads_every_storage_form() -> None:
    column = VectorType()
    dialect = postgresql.dialect()
    assert column.process_bind_param([1, 2.5], dialect) == [1.0, 2.5]
    assert column.process_result_value("[1.0, 2.5]", dialect) == [1.0, 2.5]  # JSON text
    assert column.process_result_value([1, 2.5], dialect) == [1.0, 2.5]  # decoded JSON
    assert column.process_result_value(None, dialect) is None
    with pytest.raises(ValueError, match="NaN"):
        column.process_bind_param([float("nan")], dialect)
