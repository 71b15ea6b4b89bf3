"""Bring a database to a schema revision with Alembic, from code or the CLI.

The migration scripts ship inside the package (``study_query_llm/db/migrations``), so an
installed wheel can migrate without a top-level ``alembic.ini``. Upgrading never drops or
recreates anything that exists; running `upgrade` on an up-to-date database does nothing.
Concurrent upgrades (several app processes starting at once) are serialised: an advisory
lock on PostgreSQL, the write lock (``BEGIN IMMEDIATE``) on SQLite.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from study_query_llm.db.connection import get_engine, writer_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x53514C4C4D  # arbitrary, constant: "SQLLM"
# Created with raw SQL by the migrations and not part of Base.metadata: the SQLite FTS5
# table (and its shadow tables raw_calls_fts_data, ...), the search text relation (a
# view on SQLite, a trigger-filled table on PostgreSQL), and the generated pgvector
# column embedding_vectors.embedding (only where the server has pgvector).
SQL_ONLY_TABLES = ("raw_calls_fts", "raw_call_search_text")
SQL_ONLY_COLUMNS = (("embedding_vectors", "embedding"),)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic filter: leave the raw-SQL objects out of autogenerate comparisons."""
    if type_ == "table" and name is not None and name.startswith(SQL_ONLY_TABLES):
        return False
    if type_ == "column":
        return (obj.table.name, name) not in SQL_ONLY_COLUMNS
    return True


def load_models() -> None:
    """Import every ``study_query_llm.db.models_*`` module, so `Base.metadata` is complete.

    Alembic's env.py and the schema test call this; a new model module is picked up
    without editing either (its tables still need a migration, which the test checks).
    """
    package = Path(__file__).resolve().parent
    for module in pkgutil.iter_modules([str(package)]):
        if module.name.startswith("models"):
            importlib.import_module(f"{__package__}.{module.name}")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations (and at `url`, if given)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply every migration up to `revision` (default: the newest)."""
    _run(url, lambda config: command.upgrade(config, revision))


def downgrade(url: str, revision: str) -> None:
    """Undo migrations down to `revision` ("base" removes every table this project made)."""
    _run(url, lambda config: command.downgrade(config, revision))


def current(url: str) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def heads() -> tuple[str, ...]:
    """Every head revision of the migration scripts (one, unless history has branched)."""
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def head() -> str:
    """The newest revision of the migration scripts."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:  # pragma: no cover - the package always ships migrations
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return revision


def _run(url: str, action: Callable[[Config], None]) -> None:
    engine = writer_engine(get_engine(url))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        config = alembic_config(url)
        config.attributes["connection"] = connection
        action(config)
