"""Logging for the app: text or JSON lines with request and call ids, no prompt text, no secrets.

`configure_logging(settings)` installs one handler on the root logger. Each line carries
the id of the HTTP request or websocket it came from (`REQUEST_ID`) and whatever the
registered context providers add (the dashboard adds the session and the user).

- Provider calls: one line per recorded call (`log_provider_call`) with its call id,
  provider, model, status, latency, tokens and cost.
- Database work: one INFO line per committed write transaction, each statement at DEBUG,
  errors at WARNING; never a bound parameter (SQLAlchemy events, see
  `install_database_logging`).
- User actions: the dashboard logs sign-ins, sessions, requests and uploads.

Prompt and response text reaches a line only with LOG_PROMPTS=true (without it, the
libraries that would log request bodies at DEBUG are held at INFO, and parameter dumps
in database errors are cut). The values of secrets (API keys, the database password,
cookie and OAuth secrets) are masked in every line whatever the settings.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from pydantic import SecretStr
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

from .config import Settings

REQUEST_ID: ContextVar[str | None] = ContextVar("sqllm_request_id", default=None)
ContextProvider = Callable[[], Mapping[str, Any]]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Libraries that log request bodies or widget values at DEBUG: held at INFO unless
# LOG_PROMPTS=true. SQLAlchemy echoes statements and parameters at INFO: always WARNING
# (database work is logged by this module's own events instead).
TEXT_LOGGERS = ("openai", "anthropic", "httpx", "httpcore", "panel", "bokeh")
SQL_ECHO_LOGGERS = ("sqlalchemy",)
SLOW_STATEMENT_MS = 1000.0
MASK = "***"

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_CONTEXT_KEYS = ("request_id", "session", "user")
_SQL_PARAMETERS = re.compile(r"\[parameters: [^\n]*")
_FAILING_ROW = re.compile(r"Failing row contains [^\n]*")
_HIDDEN_PARAMETERS = "[parameters: hidden; LOG_PROMPTS=true shows them]"

calls_log = logging.getLogger("study_query_llm.calls")
db_log = logging.getLogger("study_query_llm.db.ops")
# Without a configured handler (the command line), these lines go nowhere rather than
# to Python's last-resort stderr handler: the CLI reports failures in its own words.
calls_log.addHandler(logging.NullHandler())
db_log.addHandler(logging.NullHandler())


class _Options:
    """Process-wide logging options (one configuration per process, never per user)."""

    def __init__(self) -> None:
        self.log_prompts = False
        self.secrets: tuple[str, ...] = ()
        self.providers: list[ContextProvider] = []
        self.database_events = False


_options = _Options()


# --- ids and context ----------------------------------------------------------------------


def new_request_id() -> str:
    """A fresh id for a request, websocket or job (16 hex characters)."""
    return secrets.token_hex(8)


def bind_request_id(value: str | None = None) -> str:
    """Make `value` (or a fresh id) the request id of the current context; returns it."""
    request_id = value or new_request_id()
    REQUEST_ID.set(request_id)
    return request_id


def add_context_provider(provider: ContextProvider) -> None:
    """Add fields to every line (e.g. the dashboard's session and user); called per line."""
    if provider not in _options.providers:
        _options.providers.append(provider)


def log_prompts_enabled() -> bool:
    """Whether LOG_PROMPTS=true: prompt and response text may be logged."""
    return _options.log_prompts


# --- secrets and text -------------------------------------------------------------------------


def secret_values(settings: Settings) -> list[str]:
    """Every secret value the settings hold, for masking: keys, passwords, cookie secrets."""
    values: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            values.append(value.get_secret_value())
    try:
        password = make_url(settings.database_url).password
    except ArgumentError:
        password = None
    values.append(str(password) if password else "")
    values.append(os.environ.get("PGPASSWORD", ""))
    # Short values would mask ordinary words; real secrets are longer.
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every known secret masked and (unless LOG_PROMPTS) SQL parameters cut."""
    for secret in _options.secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if not _options.log_prompts:
        text = _SQL_PARAMETERS.sub(_HIDDEN_PARAMETERS, text)
        text = _FAILING_ROW.sub("Failing row contains (hidden)", text)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


# --- filter and formatters --------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Adds the request id and the registered context fields to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        for provider in _options.providers:
            try:
                fields = provider()
            except Exception:  # a context provider must never break logging
                continue
            for key, value in fields.items():
                if getattr(record, key, None) is None:
                    setattr(record, key, value)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_") and value is not None
    }


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, context and event fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _extras(record).items():
            payload[key] = _clean(value)
        if record.exc_info and record.exc_info[0] is not None:
            payload["exc_type"] = record.exc_info[0].__name__
            payload["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request_id=... user=...] message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        context = " ".join(f"{k}={extras.pop(k)}" for k in _CONTEXT_KEYS if k in extras)
        fields = " ".join(
            f"{k}={json.dumps(_clean(v), ensure_ascii=False, default=str)}"
            if not isinstance(v, int | float)
            else f"{k}={v}"
            for k, v in extras.items()
        )
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}"
        if context:
            line += f" [{context}]"
        line += f" {record.getMessage()}"
        if fields:
            line += f" {fields}"
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


# --- configuration ----------------------------------------------------------------------------


def parse_level(value: str) -> int:
    """LOG_LEVEL as a logging level; anything else is a clear error."""
    name = value.strip().upper()
    if name not in LEVELS:
        raise ValueError(f"LOG_LEVEL must be one of {', '.join(LEVELS)} (got {value!r})")
    return getattr(logging, name)


def _quiet_migration_context(record: logging.LogRecord) -> bool:
    """Drop Alembic's announcement of its context, made on every schema check (/health)."""
    return not str(record.msg).startswith(("Context impl", "Will assume"))


def configure_logging(settings: Settings, *, stream: IO[str] | None = None) -> logging.Handler:
    """Route every logger through one handler in the configured format; returns it."""
    level = parse_level(settings.log_level)
    _options.log_prompts = settings.log_prompts
    _options.secrets = tuple(secret_values(settings))

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler._sqllm = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sqllm", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Panel and Bokeh install their own handlers; send their lines through ours instead.
    for name in ("panel", "bokeh"):
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    for name in TEXT_LOGGERS:
        held = level if settings.log_prompts else max(level, logging.INFO)
        logging.getLogger(name).setLevel(held)
    for name in SQL_ECHO_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    migration_log = logging.getLogger("alembic.runtime.migration")
    if _quiet_migration_context not in migration_log.filters:
        migration_log.addFilter(_quiet_migration_context)
    logging.captureWarnings(True)
    install_database_logging()
    return handler


def reset_logging() -> None:
    """Undo `configure_logging`: remove its handler, forget secrets, options and providers."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_sqllm", False)]:
        root.removeHandler(handler)
    _options.log_prompts = False
    _options.secrets = ()
    _options.providers.clear()
    logging.captureWarnings(False)


# --- provider calls ---------------------------------------------------------------------------


def _prompt_text(request_json: Mapping[str, Any] | None) -> str | None:
    if not request_json:
        return None
    if isinstance(request_json.get("input"), str):
        return request_json["input"]
    messages = request_json.get("messages") or []
    users = [
        m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"
    ]
    return str(users[-1]) if users else None


def log_provider_call(call: Any, call_id: int) -> None:
    """One line for a recorded provider call (a `NewCall` and its `raw_calls` id)."""
    if not calls_log.isEnabledFor(logging.INFO):
        return
    meta = call.metadata_json or {}
    error = call.error_json or {}
    fields: dict[str, Any] = {
        "event": "provider_call",
        "call_id": call_id,
        "provider": call.provider,
        "model": call.model,
        "modality": call.modality,
        "status": call.status,
        "latency_ms": None if call.latency_ms is None else round(float(call.latency_ms), 1),
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "total_tokens": call.total_tokens,
        "cost_usd": call.cost_usd,
        "attempt": meta.get("attempt"),
        "request_hash": (call.request_hash or "")[:16] or None,
        "error_type": error.get("type"),
        "status_code": error.get("status_code"),
    }
    if _options.log_prompts:
        fields["prompt"] = _prompt_text(call.request_json)
        fields["response"] = (call.response_json or {}).get("text")
        fields["error"] = error.get("message")
    level = logging.INFO if call.status == "success" else logging.WARNING
    calls_log.log(level, "provider call %s", call.status, extra=fields)


def log_provider_calls(calls: Iterable[Any], call_ids: Iterable[int]) -> None:
    """`log_provider_call` for each call and its id."""
    for call, call_id in zip(calls, call_ids, strict=True):
        log_provider_call(call, call_id)


# --- database operations ----------------------------------------------------------------------

_VERB = re.compile(r"^\s*(\w+)")
_TABLE = re.compile(r"\b(?:INTO|UPDATE|FROM)\s+\"?(\w+)", re.I)
_WRITES = {"INSERT", "UPDATE", "DELETE"}
_DDL = {"CREATE", "ALTER", "DROP"}


def _describe(statement: str) -> tuple[str, str | None]:
    match = _VERB.match(statement)
    verb = match.group(1).upper() if match else "?"
    table = None if verb in _DDL else _TABLE.search(statement)
    return verb, (table.group(1) if table else None)


def _backend(conn: Any) -> str | None:
    try:
        return conn.engine.url.get_backend_name()
    except Exception:
        return None


def _before_execute(conn, _cursor, _statement, _parameters, _context, _executemany) -> None:
    conn.info["sqllm_started"] = time.perf_counter()


def _after_execute(conn, cursor, statement, parameters, _context, executemany) -> None:
    started = conn.info.pop("sqllm_started", None)
    ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
    verb, table = _describe(statement)
    rows = cursor.rowcount if cursor.rowcount is not None and cursor.rowcount >= 0 else None
    if rows is None and executemany and isinstance(parameters, list | tuple):
        rows = len(parameters)
    if verb in _WRITES or verb in _DDL:
        writes: dict[str, int] = conn.info.setdefault("sqllm_writes", {})
        key = "schema change" if verb in _DDL else f"{verb.lower()} {table or '?'}"
        writes[key] = writes.get(key, 0) + (1 if verb in _DDL or rows is None else rows)
    fields = {
        "event": "db_statement",
        "operation": verb,
        "table": table,
        "rows": rows,
        "duration_ms": round(ms, 2),
        "db": _backend(conn),
    }
    if ms >= SLOW_STATEMENT_MS:
        db_log.warning("slow database statement", extra=fields)
    elif db_log.isEnabledFor(logging.DEBUG):
        db_log.debug("database statement", extra=fields)


def _take_writes(conn) -> dict[str, int] | None:
    """The writes counted on this connection, or None once the connection is gone.

    A connection the server killed mid-transaction cannot be asked for its info
    until the rollback finishes; the count died with it, and logging must never
    turn the original failure into a different one.
    """
    if conn.invalidated:
        return None
    try:
        return conn.info.pop("sqllm_writes", None)
    except sa_exc.SQLAlchemyError:
        return None


def _on_commit(conn) -> None:
    writes = _take_writes(conn)
    if writes:
        db_log.info(
            "database write committed",
            extra={"event": "db_commit", "writes": writes, "db": _backend(conn)},
        )


def _on_rollback(conn) -> None:
    writes = _take_writes(conn)
    if writes:
        db_log.warning(
            "database write rolled back",
            extra={"event": "db_rollback", "writes": writes, "db": _backend(conn)},
        )


def _on_error(context) -> None:
    verb, table = _describe(context.statement or "")
    db_log.warning(
        "database error",
        extra={
            "event": "db_error",
            "error": type(context.original_exception).__name__,
            "operation": verb,
            "table": table,
            "disconnect": bool(context.is_disconnect),
            "db": context.engine.url.get_backend_name() if context.engine is not None else None,
        },
    )


def install_database_logging() -> None:
    """Log database operations of every engine in this process (idempotent)."""
    if _options.database_events:
        return
    event.listen(Engine, "before_cursor_execute", _before_execute)
    event.listen(Engine, "after_cursor_execute", _after_execute)
    event.listen(Engine, "commit", _on_commit)
    event.listen(Engine, "rollback", _on_rollback)
    event.listen(Engine, "handle_error", _on_error)
    _options.database_events = True
