"""Log lines: JSON or text with request ids and context, no secrets, no prompt text by default."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest

from study_query_llm.config import Settings
from study_query_llm.db.records import NewCall
from study_query_llm.logging_setup import (
    SQL_ECHO_LOGGERS,
    TEXT_LOGGERS,
    add_context_provider,
    bind_request_id,
    configure_logging,
    log_provider_call,
    reset_logging,
)

OPENAI_KEY = "sk-test-SECRET123"
DB_PASSWORD = "dbpass-SECRET000"
DB_URL = f"postgresql+psycopg://lab:{DB_PASSWORD}@db.example:5432/study"
log = logging.getLogger("tests.logging")

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """Configure logging into a string; everything is put back afterwards."""
    root = logging.getLogger()
    names = ("panel", "bokeh", *TEXT_LOGGERS, *SQL_ECHO_LOGGERS)
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    saved_handlers = {n: list(logging.getLogger(n).handlers) for n in ("panel", "bokeh")}
    root_level = root.level

    def make(**settings) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(Settings(_env_file=None, **settings), stream=stream)
        return stream

    yield make
    reset_logging()
    root.setLevel(root_level)
    for name, (level, propagate) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).propagate = propagate
    for name, handlers in saved_handlers.items():
        logging.getLogger(name).handlers[:] = handlers


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_request_id_context_and_event_fields(configure: Configure) -> None:
    stream = configure(log_format="json")
    add_context_provider(lambda: {"session": "s-1", "user": "alice"})
    request_id = bind_request_id()
    log.info("did %s", "something", extra={"event": "user_action", "rows": 3})
    [line] = lines(stream)
    assert line["message"] == "did something"
    assert line["level"] == "INFO" and line["logger"] == "tests.logging"
    assert line["request_id"] == request_id and len(request_id) == 16
    assert (line["session"], line["user"]) == ("s-1", "alice")
    assert (line["event"], line["rows"]) == ("user_action", 3)
    assert line["ts"].endswith("Z")


def test_text_lines_show_context_then_fields(configure: Configure) -> None:
    stream = configure(log_format="text")
    bind_request_id("abcdef0123456789")
    log.warning("slow", extra={"event": "db_statement", "duration_ms": 1500.5})
    text = stream.getvalue().strip()
    assert " WARNING tests.logging [request_id=abcdef0123456789] slow " in text
    assert text.endswith('event="db_statement" duration_ms=1500.5')


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secret_values_never_reach_a_line(configure: Configure, fmt: str) -> None:
    stream = configure(
        log_format=fmt,
        openai_api_key=OPENAI_KEY,
        database_url=DB_URL,
        panel_cookie_secret="cookie-SECRET789",
    )
    log.info("key %s in the message", OPENAI_KEY, extra={"url": DB_URL, "nested": [OPENAI_KEY]})
    try:
        raise RuntimeError(f"connect to {DB_URL} failed; cookie-SECRET789")
    except RuntimeError:
        log.exception("it failed")
    text = stream.getvalue()
    for secret in (OPENAI_KEY, DB_PASSWORD, "cookie-SECRET789"):
        assert secret not in text
    assert text.count("***") >= 4


def test_sql_parameters_are_hidden_unless_prompts_may_be_logged(configure: Configure) -> None:
    error = (
        "(sqlite3.IntegrityError) refused\n[SQL: INSERT INTO raw_calls (request_json) VALUES (?)]"
        '\n[parameters: (\'{"messages": "my secret prompt"}\',)]'
    )
    stream = configure(log_format="text")
    log.warning(error)
    assert "my secret prompt" not in stream.getvalue()
    assert "[parameters: hidden; LOG_PROMPTS=true shows them]" in stream.getvalue()
    assert "[SQL: INSERT INTO raw_calls" in stream.getvalue()
    stream = configure(log_format="text", log_prompts=True)
    log.warning(error)
    assert "my secret prompt" in stream.getvalue()


def _call(**fields) -> NewCall:
    values = {
        "provider": "mock",
        "model": "mock-small",
        "status": "success",
        "request_json": {"messages": [{"role": "user", "content": "PROMPT TEXT 42"}]},
        "response_json": {"text": "RESPONSE TEXT 42"},
        "latency_ms": 12.345,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "cost_usd": None,
        "request_hash": "ab" * 32,
        "metadata_json": {"attempt": 2},
    }
    return NewCall(**(values | fields))


def test_provider_call_lines_have_the_call_id_and_no_text_by_default(
    configure: Configure,
) -> None:
    stream = configure(log_format="json")
    log_provider_call(_call(), 17)
    [line] = lines(stream)
    assert line["event"] == "provider_call" and line["call_id"] == 17
    assert (line["provider"], line["model"], line["status"]) == ("mock", "mock-small", "success")
    assert (line["latency_ms"], line["total_tokens"], line["attempt"]) == (12.3, 7, 2)
    assert line["request_hash"] == "ab" * 8
    assert "TEXT 42" not in stream.getvalue()


def test_failed_calls_are_warnings_with_the_error_kind(configure: Configure) -> None:
    stream = configure(log_format="json")
    failed = _call(
        status="failed",
        response_json=None,
        error_json={"type": "rate_limit", "status_code": 429, "message": "PROMPT TEXT 42"},
    )
    log_provider_call(failed, 18)
    [line] = lines(stream)
    assert line["level"] == "WARNING"
    assert (line["error_type"], line["status_code"]) == ("rate_limit", 429)
    assert "TEXT 42" not in stream.getvalue()


def test_log_prompts_adds_prompt_and_response_text(configure: Configure) -> None:
    stream = configure(log_format="json", log_prompts=True)
    log_provider_call(_call(), 19)
    [line] = lines(stream)
    assert (line["prompt"], line["response"]) == ("PROMPT TEXT 42", "RESPONSE TEXT 42")


def test_chatty_libraries_stay_at_info_unless_prompts_may_be_logged(
    configure: Configure,
) -> None:
    stream = configure(log_format="json", log_level="DEBUG")
    logging.getLogger("openai._base_client").debug("Request options: PROMPT TEXT 42")
    logging.getLogger("sqlalchemy.engine.Engine").info("[generated] ('PROMPT TEXT 42',)")
    log.debug("our own debug line")
    assert [line["message"] for line in lines(stream)] == ["our own debug line"]
    stream = configure(log_format="json", log_level="DEBUG", log_prompts=True)
    logging.getLogger("openai._base_client").debug("Request options: PROMPT TEXT 42")
    logging.getLogger("sqlalchemy.engine.Engine").info("[generated] ('PROMPT TEXT 42',)")
    assert [line["message"] for line in lines(stream)] == ["Request options: PROMPT TEXT 42"]


def test_panel_and_bokeh_lines_go_through_the_same_handler(configure: Configure) -> None:
    stream = configure(log_format="json")
    logging.getLogger("panel.io.server").info("Session 1 created")
    logging.getLogger("bokeh.server.server").info("Starting Bokeh server")
    assert [line["logger"] for line in lines(stream)] == ["panel.io.server", "bokeh.server.server"]


def test_a_bad_log_level_is_a_clear_error(configure: Configure) -> None:
    with pytest.raises(ValueError, match="LOG_LEVEL must be one of DEBUG, INFO"):
        configure(log_level="LOUD")
