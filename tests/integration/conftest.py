"""Databases for integration tests: a fresh, migrated SQLite file or PostgreSQL database.

`db_url` is parametrized over ``sqlite`` and ``postgres``, so every test that uses it
runs on both. Each test gets its own database, built by the shipped migrations:
SQLite runs `migrate.upgrade` on a new file; PostgreSQL copies a template database that
was migrated once per session (``CREATE DATABASE ... TEMPLATE``), which is much faster
than migrating each time and still exactly the migrated schema.

PostgreSQL: the server at TEST_POSTGRES_URL (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``) must let this user create
databases. Every database made here is named ``sqllm_test_<hex>...`` and dropped at the
end. If the server is unreachable the PostgreSQL tests are skipped — or fail, when
CI=true, so CI cannot go green without them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from study_query_llm.db import migrate
from study_query_llm.db.connection import dispose_engine, get_engine, normalize_url
from study_query_llm.db.records import NewCall

DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _libpq_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class PostgresServer:
    """Creates and drops throwaway databases on the test server."""

    admin_url: URL
    prefix: str
    _created: list[str] = field(default_factory=list)

    def admin_connect(self):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(_libpq_url(self.admin_url), autocommit=True, connect_timeout=5)

    def url_for(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def create_database(self, template: str | None = None) -> str:
        name = f"{self.prefix}_{len(self._created)}"
        sql = f'CREATE DATABASE "{name}"'
        if template is not None:
            sql += f' TEMPLATE "{template}"'
        with self.admin_connect() as conn:
            conn.execute(sql)
        self._created.append(name)
        return name

    def drop_database(self, name: str) -> None:
        dispose_engine(self.url_for(name))
        with self.admin_connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop_all(self) -> None:
        for name in reversed(self._created):
            self.drop_database(name)
        self._created.clear()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The test PostgreSQL server; skips (or fails when CI=true) if it is unreachable."""
    admin_url = normalize_url(os.environ.get("TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL))
    server = PostgresServer(admin_url, f"sqllm_test_{secrets.token_hex(4)}")
    try:
        with server.admin_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # ImportError (no psycopg) or any connection failure
        message = f"PostgreSQL at {admin_url!r} is unreachable: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: PostgreSQL tests must run)", pytrace=False)
        pytest.skip(message)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def pg_template(pg_server: PostgresServer) -> str:
    """A database migrated to head once per session, copied for each test."""
    name = pg_server.create_database()
    url = pg_server.url_for(name)
    migrate.upgrade(url)
    dispose_engine(url)  # a template must have no open connections when it is copied
    return name


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres``: which database this run of the test uses."""
    return request.param


@pytest.fixture
def empty_db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database with no tables at all (for migration tests)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
        yield url
        dispose_engine(url)
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = server.create_database()
    yield server.url_for(name)
    server.drop_database(name)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database migrated to head by the shipped migrations."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        migrate.upgrade(url)
        yield url
        dispose_engine(url)
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    template: str = request.getfixturevalue("pg_template")
    name = server.create_database(template=template)
    yield server.url_for(name)
    server.drop_database(name)


@pytest.fixture
def pg_db_url(pg_server: PostgresServer, pg_template: str) -> Iterator[str]:
    """URL of a fresh migrated PostgreSQL database (for PostgreSQL-only tests)."""
    name = pg_server.create_database(template=pg_template)
    yield pg_server.url_for(name)
    pg_server.drop_database(name)


@pytest.fixture
def engine(db_url: str) -> Engine:
    """The process-wide engine of `db_url`."""
    return get_engine(db_url)


@pytest.fixture
def make_call() -> Callable[..., NewCall]:
    """Build a `NewCall` with plausible defaults; keyword arguments override fields.

    ``prompt="..."`` and ``response="..."`` are shortcuts for a one-message chat request
    and a response with that text.
    """

    def make(*, prompt: str = "What is 2 + 2?", response: str | None = "4", **fields: Any):
        values: dict[str, Any] = {
            "provider": "mock",
            "model": "mock-1",
            "status": "success",
            "request_json": {"messages": [{"role": "user", "content": prompt}]},
            "response_json": None if response is None else {"text": response},
            "latency_ms": 12.5,
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "total_tokens": 6,
            "cost_usd": 0.0001,
        }
        values.update(fields)
        return NewCall(**values)

    return make
