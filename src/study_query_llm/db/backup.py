"""Copy a live SQLite database with SQLite's online backup API (PostgreSQL: use pg_dump).

The copy is one consistent snapshot taken in a single backup step: with the WAL journal
the app uses, writers carry on while it is taken. It is written next to the target under
a temporary name, checked (``PRAGMA quick_check``) and only then renamed into place, so
a failed backup never leaves a half-written file where the backup should be.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

BUSY_TIMEOUT_S = 30.0


class BackupError(ValueError):
    """The backup cannot be made; the message says why (and what to do instead)."""


@dataclass(frozen=True)
class BackupResult:
    """What was written."""

    path: Path
    size_bytes: int
    calls: int | None
    schema: str | None


def pg_dump_command(database_url: str, target: str | Path = "study_query_llm.dump") -> str:
    """The pg_dump command that backs up a PostgreSQL URL (without its password)."""
    url = make_url(database_url)
    libpq = URL.create(
        "postgresql",
        username=url.username,
        host=url.host,
        port=url.port,
        database=url.database,
        query=url.query,
    ).render_as_string(hide_password=False)
    return f"pg_dump --format=custom --file={shlex.quote(str(target))} {shlex.quote(libpq)}"


def _source_file(database_url: str) -> Path:
    try:
        url = make_url(database_url)
    except ArgumentError:
        raise BackupError("DATABASE_URL is not a valid database URL") from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        raise BackupError(
            "db backup copies SQLite databases; for PostgreSQL run "
            f"{pg_dump_command(database_url)} (password from PGPASSWORD or ~/.pgpass)"
        )
    if backend != "sqlite":
        raise BackupError(f"db backup copies SQLite databases, not {backend}")
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise BackupError("an in-memory SQLite database has nothing on disk to back up")
    path = Path(database).expanduser()
    if not path.is_file():
        raise BackupError(f"{path}: no such database file")
    return path


def _target_file(source: Path, target: str | Path, overwrite: bool) -> Path:
    path = Path(target).expanduser()
    if path.is_dir():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = path / f"{source.stem}-{stamp}.db"
    if not path.parent.is_dir():
        raise BackupError(f"{path.parent}: no such directory")
    if path.resolve() == source.resolve():
        raise BackupError("the backup cannot overwrite the database itself")
    if path.exists() and not overwrite:
        raise BackupError(f"{path} already exists; pass --force to replace it")
    return path


def _describe(connection: sqlite3.Connection) -> tuple[int | None, str | None]:
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    calls = (
        connection.execute("SELECT count(*) FROM raw_calls").fetchone()[0]
        if "raw_calls" in tables
        else None
    )
    schema = (
        connection.execute("SELECT version_num FROM alembic_version").fetchone()
        if "alembic_version" in tables
        else None
    )
    return calls, (schema[0] if schema else None)


def backup_sqlite(
    database_url: str, target: str | Path, *, overwrite: bool = False
) -> BackupResult:
    """Copy the SQLite database of `database_url` to `target` (a file, or a directory).

    Safe while the app is writing. Raises `BackupError` for PostgreSQL (naming the
    pg_dump command to use), a missing source, or a target that exists (unless
    `overwrite`).
    """
    source = _source_file(database_url)
    path = _target_file(source, target, overwrite)
    partial = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    try:
        # mode=rw: never create an empty database where the source should be.
        src = sqlite3.connect(
            f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S
        )
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # all pages in one step: one consistent snapshot
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                check = dst.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise BackupError(f"the copy failed SQLite's integrity check: {check}")
                calls, schema = _describe(dst)
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(partial, path)
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite could not copy {source}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return BackupResult(path=path, size_bytes=path.stat().st_size, calls=calls, schema=schema)
