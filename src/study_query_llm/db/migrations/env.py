"""Alembic environment: runs the packaged migrations against `Base.metadata`.

`study_query_llm.db.migrate` passes an open connection in ``config.attributes``; the
``alembic`` command line works too, with ``sqlalchemy.url`` set or DATABASE_URL in the
environment. SQLite uses batch mode, so ALTERs in future revisions work there.
Offline (``--sql``) mode is not supported: the migrations look at the server
(available extensions) while they run.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from study_query_llm.db.base import Base
from study_query_llm.db.connection import get_engine
from study_query_llm.db.migrate import include_object, load_models

load_models()  # every models_* module registers its tables on Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=include_object,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        from study_query_llm.config import get_settings

        url = get_settings().database_url
    with get_engine(url).begin() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
run_migrations_online()
