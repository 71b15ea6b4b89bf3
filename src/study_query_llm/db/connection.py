"""Engines (one per database URL per process), the unit of work, and retried writes.

```python
engine = get_engine(settings.database_url)
with UnitOfWork(engine) as uow:          # rolls back unless told to commit
    call_id = uow.calls.add(new_call)
    uow.commit()

run_write(engine, lambda uow: uow.calls.add(new_call))   # commits; retries transient errors
```
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from study_query_llm.db.repositories import (
    ArtifactRepository,
    EmbeddingRepository,
    GroupRepository,
    InferenceRepository,
    RawCallRepository,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option read by the SQLite "begin" hook: "IMMEDIATE" takes the write lock at
# BEGIN, so concurrent writers wait on busy_timeout instead of failing mid-transaction.
_BEGIN_OPTION = "sqllm_sqlite_begin"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def normalize_url(url: str | URL) -> URL:
    """The URL with a driver: plain ``postgresql://`` (or ``postgres://``) uses psycopg 3."""
    text = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
    if text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://") :]
    parsed = make_url(text)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


# Keep non-ASCII text as is (search reads it back through the database's JSON functions)
# and refuse NaN/Infinity, which neither database accepts as JSON. One encoder for the
# process: `json.dumps` with options builds a new one per value (a third of the cost of
# serialising a call's small JSON documents in a bulk insert).
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def json_text(value: Any) -> str:
    """`value` as the JSON text the database is given (ValueError for NaN/Infinity)."""
    return _JSON_ENCODER.encode(value)


def get_engine(url: str | URL) -> Engine:
    """The engine for `url`, created on first use and shared by the whole process.

    SQLite: the parent directory of the file is created; every connection runs in WAL
    mode with a busy timeout and foreign keys on. PostgreSQL: psycopg 3 with pre-ping,
    so connections dropped by a server restart are replaced on checkout.
    """
    parsed = normalize_url(url)
    key = parsed.render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(parsed)
            _engines[key] = engine
        return engine


def dispose_engine(url: str | URL) -> None:
    """Close the pooled connections of `url`'s engine and forget it (tests, shutdown)."""
    key = normalize_url(url).render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.pop(key, None)
    if engine is not None:
        engine.dispose()


def dispose_all_engines() -> None:
    """Dispose every engine this process created."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.dispose()


def _create_engine(url: URL) -> Engine:
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _create_sqlite_engine(url)
    if backend == "postgresql":
        return create_engine(
            url,
            pool_pre_ping=True,
            json_serializer=json_text,
            connect_args={"application_name": "study-query-llm"},
        )
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


def _create_sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    kwargs: dict[str, Any] = {"json_serializer": json_text}
    if in_memory:
        # One shared connection, or every checkout would see a different empty database.
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin
        # (see "Enabling Non-Legacy SQLite Transactional Modes" in SQLAlchemy's docs).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def writer_engine(engine: Engine) -> Engine:
    """`engine` set up for a write transaction (SQLite: BEGIN IMMEDIATE; no-op elsewhere)."""
    if engine.dialect.name != "sqlite":
        return engine
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


class UnitOfWork:
    """One database transaction and the repositories that work inside it.

    Nothing is committed unless `commit()` is called; leaving the block (normally or
    through an exception) rolls back whatever is left. Objects returned by the
    repositories stay readable after the block ends (detached with their loaded values).
    """

    session: Session
    calls: RawCallRepository
    runs: InferenceRepository
    groups: GroupRepository
    artifacts: ArtifactRepository
    embeddings: EmbeddingRepository

    def __init__(self, engine: Engine, *, write: bool = False) -> None:
        """`write=True` takes SQLite's write lock at BEGIN (see `writer_engine`)."""
        bind = writer_engine(engine) if write else engine
        self._session_factory = sessionmaker(bind=bind, expire_on_commit=False)

    def __enter__(self) -> Self:
        self.session = self._session_factory()
        self.calls = RawCallRepository(self.session)
        self.runs = InferenceRepository(self.session)
        self.groups = GroupRepository(self.session)
        self.artifacts = ArtifactRepository(self.session)
        self.embeddings = EmbeddingRepository(self.session)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # close() rolls back whatever was not committed and detaches the objects
        # *without* expiring them, so rows read inside the block stay readable after it.
        self.session.close()

    def commit(self) -> None:
        """Make the work so far permanent."""
        self.session.commit()

    def rollback(self) -> None:
        """Throw away the work since the last commit."""
        self.session.rollback()


def _psycopg_transient_types() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:  # the [postgres] extra is not installed
        return ()
    return (psycopg.OperationalError, psycopg.InterfaceError)


_TRANSIENT_DRIVER_ERRORS = (sqlite3.OperationalError, *_psycopg_transient_types())
_SQLITE_TRANSIENT_WORDS = ("locked", "busy", "disk i/o", "unable to open", "interrupted")


def is_transient_error(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying: a dropped connection, a restart, a lock or deadlock.

    Refusals by the database's own rules (constraints, the append-only triggers) are not.
    """
    if "append-only" in str(exc):
        return False
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, sqlite3.OperationalError):
        # SQLite reports schema mistakes ("no such table", syntax) as OperationalError
        # too; only locking and I/O trouble is worth another try.
        message = str(orig).lower()
        return any(word in message for word in _SQLITE_TRANSIENT_WORDS)
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
            return True
        return isinstance(exc.orig, _TRANSIENT_DRIVER_ERRORS)
    return isinstance(exc, (sa_exc.DisconnectionError, *_TRANSIENT_DRIVER_ERRORS))


def run_write(
    engine: Engine,
    fn: Callable[[UnitOfWork], T],
    *,
    attempts: int = 5,
    initial_wait_s: float = 0.1,
    max_wait_s: float = 5.0,
) -> T:
    """Run `fn(uow)` in a fresh unit of work and commit, retrying transient errors.

    Each attempt is a new transaction, so a failed attempt leaves nothing behind and
    `fn` runs again from the start: it must not have side effects outside `uow`.
    A connection lost *during* COMMIT cannot tell whether the commit happened; that
    narrow window is the one case where a retried write could land twice.
    """
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        # exponential backoff from initial_wait_s, capped, plus jitter
        wait=wait_exponential(multiplier=initial_wait_s, max=max_wait_s)
        + wait_random(0, initial_wait_s),
        retry=retry_if_exception(is_transient_error),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )

    def attempt() -> T:
        with UnitOfWork(engine, write=True) as uow:
            result = fn(uow)
            uow.commit()
            return result

    return retrying(attempt)
