"""Engines, the unit of work, and writes that survive dropped connections."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from study_query_llm.db.connection import (
    UnitOfWork,
    dispose_engine,
    get_engine,
    run_write,
)
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.records import NewCall


def test_one_engine_per_url_and_sqlite_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'deeper' / 'app.db'}"
    engine = get_engine(url)
    try:
        assert get_engine(url) is engine
        assert (tmp_path / "nested" / "deeper").is_dir()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        dispose_engine(url)
    assert get_engine(url) is not engine
    dispose_engine(url)


@pytest.mark.postgres
def test_plain_postgresql_urls_use_psycopg(pg_db_url: str) -> None:
    plain = pg_db_url.replace("postgresql+psycopg://", "postgresql://")
    engine = get_engine(plain)
    assert engine is get_engine(pg_db_url)
    assert engine.dialect.driver == "psycopg"
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT 1")) == 1


def test_unit_of_work_commits_only_when_told(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        uow.calls.add(make_call(prompt="rolled back"))
    with UnitOfWork(engine) as uow:
        kept = uow.calls.add(make_call(prompt="kept"))
        uow.commit()
        uow.calls.add(make_call(prompt="after commit, rolled back"))
    with UnitOfWork(engine) as uow:
        assert [c.id for c in uow.calls.query().rows] == [kept]
        row = uow.calls.get(kept)
    assert row.request_json["messages"][0]["content"] == "kept"  # readable after the block


def test_run_write_commits_and_returns(engine: Engine, make_call: Callable[..., NewCall]) -> None:
    call_id = run_write(engine, lambda uow: uow.calls.add(make_call()))
    with UnitOfWork(engine) as uow:
        assert uow.calls.get(call_id) is not None


def test_run_write_retries_transient_errors_without_leaving_partial_writes(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    attempts: list[int] = []

    def write(uow: UnitOfWork) -> int:
        call_id = uow.calls.add(make_call(request_hash="retried"))
        attempts.append(call_id)
        if len(attempts) < 3:  # what the driver raises when the server goes away
            raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("disk I/O error"))
        return call_id

    call_id = run_write(engine, write, initial_wait_s=0, max_wait_s=0)
    assert len(attempts) == 3
    with UnitOfWork(engine) as uow:
        assert [c.id for c in uow.calls.query(CallFilters()).rows] == [call_id]


def test_run_write_does_not_retry_real_errors(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    attempts: list[int] = []

    def write(uow: UnitOfWork) -> None:
        attempts.append(1)
        uow.groups.create("label", "dup")
        uow.session.execute(
            text("INSERT INTO groups (group_type, name, created_at) VALUES ('label', 'dup', :c)"),
            {"c": "2024-01-01 00:00:00"},
        )

    with pytest.raises(IntegrityError):
        run_write(engine, write, initial_wait_s=0, max_wait_s=0)
    assert len(attempts) == 1

    def refuse(uow: UnitOfWork) -> None:
        attempts.append(1)
        uow.calls.add(make_call())
        uow.session.execute(text("DELETE FROM raw_calls"))

    with pytest.raises(Exception, match="append-only"):
        run_write(engine, refuse, initial_wait_s=0, max_wait_s=0)
    assert len(attempts) == 2


def test_concurrent_sqlite_writers_all_land(
    tmp_path: Path, make_call: Callable[..., NewCall]
) -> None:
    from study_query_llm.db import migrate

    url = f"sqlite:///{tmp_path / 'concurrent.db'}"
    migrate.upgrade(url)
    engine = get_engine(url)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                run_write(
                    engine,
                    lambda uow, i=i: uow.calls.add_many(
                        [make_call(provider=f"w{n}", prompt=f"{n}-{i}-{k}") for k in range(4)]
                    ),
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        with UnitOfWork(engine) as uow:
            assert uow.calls.count() == 4 * 25 * 4
            assert len(uow.calls.search("3-24-3")) == 1
    finally:
        dispose_engine(url)


@pytest.mark.postgres
def test_write_lands_exactly_once_when_the_connection_is_killed_mid_write(
    pg_db_url: str, pg_server, make_call: Callable[..., NewCall]
) -> None:
    engine = get_engine(pg_db_url)
    attempts: list[int] = []

    def write(uow: UnitOfWork) -> int:
        attempts.append(1)
        call_id = uow.calls.add(make_call(request_hash="survivor"))
        uow.groups.add_members(uow.groups.get_or_create("batch", "b").id, [call_id])
        if len(attempts) == 1:
            pid = uow.session.scalar(text("SELECT pg_backend_pid()"))
            _terminate(pg_server, pid)  # the server drops this connection mid-transaction
        uow.session.execute(text("SELECT 1"))
        return call_id

    call_id = run_write(engine, write, initial_wait_s=0, max_wait_s=0)
    assert len(attempts) == 2
    with UnitOfWork(engine) as uow:
        rows = uow.calls.query(CallFilters()).rows
        assert [(c.id, c.request_hash) for c in rows] == [(call_id, "survivor")]
        group = uow.groups.find("batch", "b")
        assert uow.groups.member_call_ids(group.id) == [call_id]


@pytest.mark.postgres
def test_pooled_connections_killed_between_writes_are_replaced(
    pg_db_url: str, pg_server, make_call: Callable[..., NewCall]
) -> None:
    engine = get_engine(pg_db_url)
    run_write(engine, lambda uow: uow.calls.add(make_call()))
    database = pg_db_url.rsplit("/", 1)[1]
    with pg_server.admin_connect() as admin:
        pids = [
            row[0]
            for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", [database]
            ).fetchall()
        ]
    assert pids  # the engine's pool holds an idle connection
    for pid in pids:
        _terminate(pg_server, pid)
    attempts: list[int] = []

    def write(uow: UnitOfWork) -> int:
        attempts.append(1)
        return uow.calls.add(make_call())

    run_write(engine, write)
    assert len(attempts) == 1  # pre-ping swapped the dead connection before the write
    with UnitOfWork(engine) as uow:
        assert uow.calls.count() == 2


def _terminate(pg_server, pid: int) -> None:
    """Terminate a backend and wait (up to 10 s, server-side) until it has exited."""
    with pg_server.admin_connect() as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", [pid]).fetchone()[0]
