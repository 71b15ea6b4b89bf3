"""Full-text search over the prompt and response text of every call.

What matches: the search text is split on whitespace into terms; a call matches when
every term occurs, case-insensitively and literally, in its prompt text (all message
contents, ``prompt``, ``system`` and ``input`` of the request) or its response text
(``response_json.text``). Nothing the user types is interpreted: not as SQL (all values
are bound parameters), not as FTS syntax (``NEAR``, ``OR``, ``*`` and quotes are plain
characters), and not as LIKE wildcards (``100%`` and ``a_b`` match literally).

How: both databases expose the text as ``raw_call_search_text(id, prompt_text,
response_text)`` — a view on SQLite, a table filled by an INSERT trigger on PostgreSQL
(see the 0002 migration). SQLite searches the FTS5 table ``raw_calls_fts`` (trigram
tokenizer, external content = that view, filled by an INSERT trigger); every term
becomes a quoted FTS5 phrase. The trigram tokenizer cannot match anything shorter than
3 characters, so terms of 1–2 characters fall back to an escaped ``LIKE`` over the same
text (a scan of the rows the other terms and the filters leave; ASCII-only case folding
there). PostgreSQL matches every term with ``ILIKE`` (backslash escapes), served by
pg_trgm GIN indexes on both texts.

Ranking (higher is better, comparable only within one result list): SQLite's FTS5
``bm25``; on PostgreSQL ``ts_rank_cd`` of the stored tsvector ``document`` against the
terms as words (OR-ed ``plainto_tsquery``). Ties go to the newest call.

Snippets mark matches with `HIGHLIGHT_START` / `HIGHLIGHT_END` (``[[`` and ``]]``) and
elide cut text with ``…``. Snippet text is raw text: a UI must HTML-escape it first and
then replace the markers with ``<mark>``/``</mark>``. SQLite's snippets come from FTS5
``snippet()``; otherwise a window of text around the earliest match is cut in SQL and
the terms are marked in Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import reduce
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    case,
    cast,
    column,
    func,
    literal,
    literal_column,
    or_,
    select,
    table,
)
from sqlalchemy.orm import Session

from study_query_llm.db.errors import InvalidSearchError
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import RawCall

HIGHLIGHT_START = "[["
HIGHLIGHT_END = "]]"
ELLIPSIS = "…"
SNIPPET_CHARS = 64  # about this many characters of text around the first match
SNIPPET_BEFORE = 24  # of which this many come before it (window snippets)
MIN_TRIGRAM_CHARS = 3  # FTS5's trigram tokenizer matches nothing shorter
MAX_QUERY_CHARS = 10_000
MAX_TERMS = 64
MAX_LIMIT = 1_000
_NO_MATCH = 2**31 - 1  # sentinel position: larger than any text position

# Objects created by the migration with raw SQL (not mapped: not ordinary tables).
_fts = table(
    "raw_calls_fts",
    column("rowid", Integer),
    column("prompt_text"),
    column("response_text"),
)
_fts_ref = literal_column("raw_calls_fts")
_texts = table(
    "raw_call_search_text",
    column("id", Integer),
    column("prompt_text"),
    column("response_text"),
    column("document"),  # PostgreSQL only
)


@dataclass(frozen=True)
class SearchHit:
    """One matching call, with marked snippets of its prompt and response text."""

    call_id: int
    rank: float
    prompt_snippet: str
    response_snippet: str
    provider: str
    model: str
    status: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """The hit as a plain dict (one row of a frame)."""
        return asdict(self)


def search_terms(text: str) -> tuple[str, ...]:
    """The distinct whitespace-separated terms of `text`, in order.

    Raises `InvalidSearchError` for empty or whitespace-only text and for text longer
    than `MAX_QUERY_CHARS` or with more than `MAX_TERMS` terms.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidSearchError("search text is empty: type at least one character")
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidSearchError(
            f"search text is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}"
        )
    terms: dict[str, str] = {}
    for term in text.split():
        terms.setdefault(term.lower(), term)
    if len(terms) > MAX_TERMS:
        raise InvalidSearchError(
            f"search text has {len(terms)} distinct words; the limit is {MAX_TERMS}"
        )
    return tuple(terms.values())


def fts5_query(terms: Sequence[str]) -> str:
    """An FTS5 query requiring every term as a literal phrase (quotes doubled)."""
    return " AND ".join('"' + term.replace('"', '""') + '"' for term in terms)


def like_pattern(term: str) -> str:
    """A LIKE pattern matching `term` anywhere, with ``\\ % _`` escaped by backslash."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def mark_terms(text: str, terms: Sequence[str]) -> str:
    """`text` with every case-insensitive occurrence of a term wrapped in the markers."""
    if not text:
        return text
    alternatives = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    pattern = re.compile(alternatives, re.IGNORECASE)
    return pattern.sub(lambda m: f"{HIGHLIGHT_START}{m.group(0)}{HIGHLIGHT_END}", text)


def search_calls(
    session: Session, text: str, filters: CallFilters, limit: int = 50
) -> list[SearchHit]:
    """Calls matching `text` and `filters`, best first (see the module docstring)."""
    terms = search_terms(text)
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    postgres = session.get_bind().dialect.name == "postgresql"
    ranked_stmt = _postgres_ranked(terms) if postgres else _sqlite_ranked(terms)
    ranked_stmt = ranked_stmt.where(*filters.conditions()).limit(limit)
    ranked = session.execute(ranked_stmt).all()
    if not ranked:
        return []
    ids = [row.id for row in ranked]
    long_terms = [t for t in terms if len(t) >= MIN_TRIGRAM_CHARS]
    if not postgres and long_terms:
        snippets = _fts5_snippets(session, long_terms, ids)
    else:
        snippets = _window_snippets(session, terms, ids, postgres=postgres)
    return [
        SearchHit(
            call_id=row.id,
            rank=float(row.score),
            prompt_snippet=snippets[row.id][0],
            response_snippet=snippets[row.id][1],
            provider=row.provider,
            model=row.model,
            status=row.status,
            created_at=row.created_at,
        )
        for row in ranked
    ]


def _hit_columns(score: ColumnElement[float]) -> Select[Any]:
    return select(
        RawCall.id,
        score.label("score"),
        RawCall.provider,
        RawCall.model,
        RawCall.status,
        RawCall.created_at,
    )


def _order(stmt: Select[Any], score: ColumnElement[float]) -> Select[Any]:
    return stmt.order_by(score.desc(), RawCall.created_at.desc(), RawCall.id.desc())


def _sqlite_ranked(terms: Sequence[str]) -> Select[Any]:
    long_terms = [t for t in terms if len(t) >= MIN_TRIGRAM_CHARS]
    short_terms = [t for t in terms if len(t) < MIN_TRIGRAM_CHARS]
    if long_terms:
        score: ColumnElement[float] = cast(-func.bm25(_fts_ref), Float)
        stmt = (
            _hit_columns(score)
            .select_from(_fts)
            .join(RawCall, RawCall.id == _fts.c.rowid)
            .where(_fts_ref.op("MATCH")(fts5_query(long_terms)))
        )
    else:
        score = literal(0.0, Float)
        stmt = _hit_columns(score)
    if short_terms:
        # Too short for trigrams: an escaped LIKE over the same text (see module doc).
        stmt = stmt.join(_texts, _texts.c.id == RawCall.id).where(
            *(_contains(t, postgres=False) for t in short_terms)
        )
    return _order(stmt, score)


def _contains(term: str, *, postgres: bool) -> ColumnElement[bool]:
    """`term` occurs, case-insensitively, in the prompt or the response text."""
    pattern = like_pattern(term)
    if postgres:  # ILIKE; PostgreSQL's default LIKE escape character is the backslash
        return or_(_texts.c.prompt_text.ilike(pattern), _texts.c.response_text.ilike(pattern))
    # SQLite: LIKE ignores case (ASCII only) and has no escape character unless told
    return or_(
        _texts.c.prompt_text.like(pattern, escape="\\"),
        _texts.c.response_text.like(pattern, escape="\\"),
    )


def _postgres_ranked(terms: Sequence[str]) -> Select[Any]:
    simple = literal_column("'simple'::regconfig")
    # OR of the terms as words; plainto_tsquery never parses operators.
    query = reduce(
        lambda a, b: a.op("||")(b),
        [func.plainto_tsquery(simple, t) for t in terms],
    )
    score = cast(func.ts_rank_cd(_texts.c.document, query), Float)
    stmt = (
        _hit_columns(score)
        .select_from(_texts)
        .join(RawCall, RawCall.id == _texts.c.id)
        .where(*(_contains(t, postgres=True) for t in terms))
    )
    return _order(stmt, score)


def _fts5_snippets(
    session: Session, long_terms: Sequence[str], ids: Sequence[int]
) -> dict[int, tuple[str, str]]:
    def snippet(column_index: int) -> ColumnElement[str]:
        return func.snippet(
            _fts_ref, column_index, HIGHLIGHT_START, HIGHLIGHT_END, ELLIPSIS, SNIPPET_CHARS
        )

    stmt = select(_fts.c.rowid, snippet(0), snippet(1)).where(
        _fts_ref.op("MATCH")(fts5_query(long_terms)), _fts.c.rowid.in_(ids)
    )
    return {row[0]: (row[1] or "", row[2] or "") for row in session.execute(stmt)}


def _window_snippets(
    session: Session, terms: Sequence[str], ids: Sequence[int], *, postgres: bool
) -> dict[int, tuple[str, str]]:
    """Cut a window around each text's earliest match in SQL; mark the terms in Python."""
    texts = select(
        _texts.c.id, _texts.c.prompt_text.label("t0"), _texts.c.response_text.label("t1")
    ).where(_texts.c.id.in_(ids))
    if postgres:
        position, least, greatest = func.strpos, func.least, func.greatest
    else:  # SQLite's scalar min()/max() take two or more arguments
        position, least, greatest = func.instr, func.min, func.max
    # MATERIALIZED: compute each (possibly huge) text (a view over JSON on SQLite) and
    # its lower() once per row, however often the expressions below refer to them.
    source = texts.cte("search_texts").prefix_with("MATERIALIZED")
    lowered = (
        select(
            source.c.id,
            func.coalesce(source.c.t0, "").label("t0"),
            func.coalesce(source.c.t1, "").label("t1"),
            func.lower(func.coalesce(source.c.t0, "")).label("l0"),
            func.lower(func.coalesce(source.c.t1, "")).label("l1"),
        )
        .cte("search_lowered")
        .prefix_with("MATERIALIZED")
    )
    firsts = [
        least(
            _NO_MATCH,
            *(
                func.coalesce(
                    func.nullif(position(lowered.c[f"l{i}"], func.lower(t)), 0), _NO_MATCH
                )
                for t in terms
            ),
        ).label(f"f{i}")
        for i in (0, 1)
    ]
    located = (
        select(lowered.c.id, lowered.c.t0, lowered.c.t1, *firsts)
        .cte("search_located")
        .prefix_with("MATERIALIZED")
    )
    columns: list[ColumnElement[Any]] = [located.c.id]
    for i in (0, 1):
        text_col, first = located.c[f"t{i}"], located.c[f"f{i}"]
        start = case((first == _NO_MATCH, 1), else_=greatest(first - SNIPPET_BEFORE, 1))
        columns += [
            start.label(f"s{i}"),
            func.substr(text_col, start, SNIPPET_CHARS).label(f"w{i}"),
            func.length(text_col).label(f"n{i}"),
        ]
    result: dict[int, tuple[str, str]] = {}
    for row in session.execute(select(*columns)).mappings():
        result[row["id"]] = (
            _window(row["w0"], row["s0"], row["n0"], terms),
            _window(row["w1"], row["s1"], row["n1"], terms),
        )
    return result


def _window(window: str | None, start: int, length: int, terms: Sequence[str]) -> str:
    window = window or ""
    head = ELLIPSIS if start > 1 else ""
    tail = ELLIPSIS if start - 1 + len(window) < length else ""
    return head + mark_terms(window, terms) + tail
