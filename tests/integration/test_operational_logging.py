"""Provider calls and database work are logged with ids, on SQLite and PostgreSQL, without text.

Real calls through the inference service (mock provider) and real database errors (the
append-only trigger refusing an UPDATE) must produce structured lines that carry the call
id and the request id, and never the prompt or the bound parameters.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from study_query_llm.config import Settings
from study_query_llm.db.connection import UnitOfWork, get_engine
from study_query_llm.logging_setup import bind_request_id, configure_logging, reset_logging
from study_query_llm.services.context import open_services

MARKER = "PROMPT-MARKER-5c1e never log me"


@pytest.fixture
def logged(db_url: str) -> Iterator[tuple[Settings, io.StringIO]]:
    root = logging.getLogger()
    level = root.level
    sqlalchemy_level = logging.getLogger("sqlalchemy").level
    settings = Settings(_env_file=None, database_url=db_url, log_format="json", mock_latency_ms=1.0)
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    yield settings, stream
    reset_logging()
    root.setLevel(level)
    logging.getLogger("sqlalchemy").setLevel(sqlalchemy_level)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_recorded_call_logs_its_call_id_and_the_commit(logged) -> None:
    settings, stream = logged
    async with open_services(settings) as services:
        request_id = bind_request_id()
        result = await services.inference.run(MARKER, provider="mock")
    assert result.ok
    records = _lines(stream)
    [call] = [r for r in records if r.get("event") == "provider_call"]
    assert call["call_id"] == result.call_id
    assert call["request_id"] == request_id
    assert (call["provider"], call["status"], call["modality"]) == ("mock", "success", "chat")
    commits = [r for r in records if r.get("event") == "db_commit"]
    assert any(r["writes"].get("insert raw_calls") == 1 for r in commits)
    assert all(r["db"] == get_engine(settings.database_url).url.get_backend_name() for r in commits)
    assert MARKER not in stream.getvalue()


async def test_embeddings_are_logged_like_chat_calls(logged) -> None:
    settings, stream = logged
    async with open_services(settings) as services:
        results = await services.embeddings.embed([MARKER], provider="mock", model="mock-embed")
    lines = [r for r in _lines(stream) if r.get("event") == "provider_call"]
    assert [r["modality"] for r in lines] == ["embedding"]
    assert lines[0]["call_id"] == results[0].call_id
    assert MARKER not in stream.getvalue()


def test_a_refused_write_logs_the_error_without_its_parameters(logged, make_call) -> None:
    settings, stream = logged
    engine = get_engine(settings.database_url)
    with UnitOfWork(engine, write=True) as uow:
        [call_id] = uow.calls.add_many([make_call(prompt=MARKER)])
        uow.commit()
    with pytest.raises(DBAPIError) as refused, UnitOfWork(engine, write=True) as uow:
        uow.session.execute(
            text("UPDATE raw_calls SET model = :model WHERE id = :id"),
            {"model": MARKER, "id": call_id},
        )
        uow.commit()
    logging.getLogger("tests.ops").error("update refused", exc_info=refused.value)
    records = _lines(stream)
    [error] = [r for r in records if r.get("event") == "db_error"]
    assert (error["operation"], error["table"]) == ("UPDATE", "raw_calls")
    assert error["error"]
    assert MARKER not in stream.getvalue()
    assert "[parameters: hidden" in stream.getvalue()
