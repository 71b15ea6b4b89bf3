"""`/health`'s report: 200 only for a reachable database at the newest schema, never a URL."""

from __future__ import annotations

from panel_app.health import health_report
from study_query_llm.db import migrate
from study_query_llm.db.connection import dispose_engine


def test_a_migrated_database_is_healthy(db_url: str) -> None:
    status, body = health_report(db_url)
    assert status == 200 and body["status"] == "ok"
    assert body["database"]["reachable"] is True
    assert body["database"]["up_to_date"] is True
    assert body["database"]["schema"] == migrate.head()


def test_an_unreachable_database_is_unavailable_and_not_named() -> None:
    url = "postgresql+psycopg://lab:s3cret-pw@127.0.0.1:1/nowhere"
    status, body = health_report(url)
    assert status == 503 and body["status"] == "unavailable"
    assert body["database"]["reachable"] is False
    assert body["database"]["backend"] == "postgresql"
    assert "s3cret-pw" not in repr(body) and "nowhere" not in repr(body)
    dispose_engine(url)


def test_a_database_behind_the_newest_schema_is_degraded(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, "0001_v1_schema")
    status, body = health_report(empty_db_url)
    assert status == 503 and body["status"] == "degraded"
    assert body["database"]["reachable"] is True
    assert body["database"]["schema"] == "0001_v1_schema" != body["database"]["schema_head"]
    assert body["database"]["up_to_date"] is False
    migrate.upgrade(empty_db_url)
    assert health_report(empty_db_url)[0] == 200
