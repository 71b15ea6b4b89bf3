"""Full-text search over the prompt and response text of every call.

What matches: the search text is split on whitespace into terms (a phrase in double
quotes is one term, spaces included); a call matches when every term occurs,
case-insensitively and literally, in its prompt text (all message
contents, ``prompt``, ``system`` and ``input`` of the request) or its response text
(``response_json.text``). Nothing the user types is interpreted: not as SQL (all values
are bound parameters), not as FTS syntax (``NEAR``, ``OR``, ``*`` and quotes inside a term
are plain characters), and not as LIKE wildcards (``100%`` and ``a_b`` match literally).

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
terms as words (OR-ed ``plainto_tsquery``). Ties go to the newest call. What is ranked
are the most recently recorded `RANK_WINDOW` matches (or `limit`, if larger): every
match when there are fewer, which is the rule for specific searches; for a word that
half the record contains, ranking all of it would cost seconds and say little, so the
best of the latest matches come back in milliseconds (narrow the filters to reach
further back).

Calls whose indexing a bulk load deferred (`study_query_llm.db.search_index`) are
matched too, by a scan of just those calls: on PostgreSQL with their text and rank
computed on the fly, on SQLite with rank 0 (after the indexed hits).

Snippets mark matches with `HIGHLIGHT_START` / `HIGHLIGHT_END` (``[[`` and ``]]``) and
elide cut text with ``…``. Snippet text is raw text: a UI must HTML-escape it first and
then replace the markers with ``<mark>``/``</mark>``. On both databases a window of
text around the earliest match is cut in SQL and the terms are marked in Python (FTS5's
``snippet()`` re-reads and re-tokenizes each hit's text: several times slower).
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
    text,
)
from sqlalchemy.orm import Session

from study_query_llm.db import search_index
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
RANK_WINDOW = 500  # rank the most recently recorded this many matches (or `limit`)
SAMPLE_CALLS = 1_000  # PostgreSQL: newest calls checked to see how common the terms are
_TRIGRAM_WORD = re.compile(r"[^\W_]{3}")  # a term pg_trgm's index can narrow down
RANK_TEXT_CHARS = 100_000  # PostgreSQL ranks on this much text (see the 0002 migration)
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


_TERM = re.compile(r'"([^"]+)"|(\S+)')


def search_terms(text: str) -> tuple[str, ...]:
    """The distinct terms of `text`, in order: whitespace-separated words, or a phrase in
    double quotes (``"ticket #A"``: one term, spaces and all). A quote without its pair
    is an ordinary character.

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
    for phrase, word in _TERM.findall(text):
        term = phrase.strip() or word
        if term:
            terms.setdefault(term.lower(), term)
    if not terms:
        raise InvalidSearchError("search text is empty: type at least one character")
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
    window = max(limit, RANK_WINDOW)
    if postgres:
        ranked = _postgres_best(session, terms, filters, window, limit)
    else:
        matches, newest = _sqlite_matches(terms)
        ranked = _best(session, matches.where(*filters.conditions()), newest, window, limit)
    backlog = search_index.backlog(session)
    tail: list[Any] = []
    if backlog:
        pending = _unindexed_matches(terms, backlog, postgres).where(*filters.conditions())
        tail = _best(session, pending, RawCall.id.desc(), window, limit)
        ranked = sorted(
            [*ranked, *tail], key=lambda r: (-r.score, -r.created_at.timestamp(), -r.id)
        )[:limit]
    if not ranked:
        return []
    tail_ids = {row.id for row in tail}
    ids = [row.id for row in ranked if row.id not in tail_ids]
    snippets = _window_snippets(session, terms, ids, postgres=postgres)
    pending_ids = [row.id for row in ranked if row.id in tail_ids]
    if pending_ids:
        snippets.update(
            _window_snippets(session, terms, pending_ids, postgres=postgres, computed=postgres)
        )
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


def _best(
    session: Session, matches: Select[Any], newest: Any, window: int, limit: int
) -> list[Any]:
    """The `limit` best of the `window` most recently recorded rows of `matches`."""
    recent = matches.order_by(newest).limit(window).subquery("recent")
    stmt = (
        select(recent)
        .order_by(recent.c.score.desc(), recent.c.created_at.desc(), recent.c.id.desc())
        .limit(limit)
    )
    return list(session.execute(stmt).all())


def _hit_columns(score: ColumnElement[float]) -> Select[Any]:
    return select(
        RawCall.id,
        score.label("score"),
        RawCall.provider,
        RawCall.model,
        RawCall.status,
        RawCall.created_at,
    )


def _sqlite_matches(terms: Sequence[str]) -> tuple[Select[Any], Any]:
    """The matching calls with their score, and the order that lists them newest first
    (FTS5 walks its index in descending rowid order without sorting)."""
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
    return stmt, (_fts.c.rowid.desc() if long_terms else RawCall.id.desc())


def _contains(
    term: str, *, postgres: bool, texts: tuple[Any, Any] | None = None
) -> ColumnElement[bool]:
    """`term` occurs, case-insensitively, in the prompt or the response text."""
    pattern = like_pattern(term)
    prompt, response = texts or (_texts.c.prompt_text, _texts.c.response_text)
    if postgres:  # ILIKE; PostgreSQL's default LIKE escape character is the backslash
        return or_(prompt.ilike(pattern), response.ilike(pattern))
    # SQLite: LIKE ignores case (ASCII only) and has no escape character unless told
    return or_(prompt.like(pattern, escape="\\"), response.like(pattern, escape="\\"))


def _postgres_best(
    session: Session, terms: Sequence[str], filters: CallFilters, window: int, limit: int
) -> list[Any]:
    """The `limit` best of the `window` most recently recorded matches, on PostgreSQL.

    Two ways to find the newest matches, and which is fast depends on how common the
    terms are, which PostgreSQL cannot estimate (no statistics for substrings):
    walking the calls newest first and checking each costs about `window / share` row
    checks (stops early for common words); the trigram indexes cost a few posting-list
    reads plus a check of every candidate they return (`share` of all calls, plus
    false positives). So the newest `SAMPLE_CALLS` calls are checked first to measure
    the share, and the cheaper way is taken. (Terms without a run of three letters or
    digits cannot use the trigram indexes: then the walk it is.) The expensive case
    left is a term in about sqrt(window / calls) of the calls: ~1% of 5 million.
    """
    matches, newest = _postgres_matches(terms)
    matches = matches.where(*filters.conditions())
    sample = select(_texts).order_by(_texts.c.id.desc()).limit(SAMPLE_CALLS).subquery("sample")
    columns = (sample.c.prompt_text, sample.c.response_text)
    seen = session.execute(
        select(
            func.count(),
            func.count().filter(*(_contains(t, postgres=True, texts=columns) for t in terms)),
        ).select_from(sample)
    ).one()
    share = max(seen[1], 1) / max(seen[0], 1)
    calls = session.scalar(select(func.max(_texts.c.id))) or 0
    narrowing = [t for t in terms if _TRIGRAM_WORD.search(t)]
    if not narrowing or window / share <= share * calls:
        session.execute(text("SET LOCAL enable_bitmapscan = off"))  # newest first
        rows = session.execute(matches.order_by(newest).limit(window)).all()
        session.execute(text("SET LOCAL enable_bitmapscan = on"))
    else:
        session.execute(text("SET LOCAL enable_seqscan = off"))  # the trigram indexes
        session.execute(text("SET LOCAL enable_indexscan = off"))
        every = (
            select(_texts.c.id)
            .where(*(_contains(t, postgres=True) for t in narrowing))
            .cte("every_match")
            .prefix_with("MATERIALIZED")
        )
        candidates = matches.where(_texts.c.id.in_(select(every.c.id)))
        rows = session.execute(candidates.order_by(newest).limit(window)).all()
        session.execute(text("SET LOCAL enable_seqscan = on"))
        session.execute(text("SET LOCAL enable_indexscan = on"))
    rows.sort(key=lambda r: (-r.score, -r.created_at.timestamp(), -r.id))
    return rows[:limit]


def _ts_query(terms: Sequence[str]) -> ColumnElement[Any]:
    """The terms as words, OR-ed (plainto_tsquery never parses operators)."""
    simple = literal_column("'simple'::regconfig")
    return reduce(
        lambda a, b: a.op("||")(b),
        [func.plainto_tsquery(simple, t) for t in terms],
    )


def _postgres_matches(terms: Sequence[str]) -> tuple[Select[Any], Any]:
    """The matching calls with their score, and the order that lists them newest first."""
    score = cast(func.ts_rank_cd(_texts.c.document, _ts_query(terms)), Float)
    stmt = (
        _hit_columns(score)
        .select_from(_texts)
        .join(RawCall, RawCall.id == _texts.c.id)
        .where(*(_contains(t, postgres=True) for t in terms))
    )
    return stmt, _texts.c.id.desc()


def _computed_texts() -> tuple[Any, Any]:
    """PostgreSQL: a call's prompt and response text computed from its JSON, as the
    search trigger stores them (for calls whose indexing was deferred)."""
    return (
        func.sqllm_prompt_text(RawCall.request_json),
        func.sqllm_response_text(RawCall.response_json),
    )


def _unindexed_matches(
    terms: Sequence[str], backlog: Sequence[tuple[int, int]], postgres: bool
) -> Select[Any]:
    """Matching calls among those not indexed yet (found by a scan of just them).

    PostgreSQL ranks them exactly as indexed calls (the same text and tsvector,
    computed on the fly); SQLite's bm25 needs the index, so they rank 0, after every
    indexed hit, newest first.
    """
    pending = or_(*(RawCall.id.between(first, last) for first, last in backlog))
    if postgres:
        prompt, response = _computed_texts()
        document = func.to_tsvector(
            literal_column("'simple'::regconfig"),
            func.left(prompt.op("||")(" ").op("||")(response), RANK_TEXT_CHARS),
        )
        score = cast(func.ts_rank_cd(document, _ts_query(terms)), Float)
        return _hit_columns(score).where(
            pending, *(_contains(t, postgres=True, texts=(prompt, response)) for t in terms)
        )
    return (
        _hit_columns(literal(0.0, Float))
        .join(_texts, _texts.c.id == RawCall.id)
        .where(pending, *(_contains(t, postgres=False) for t in terms))
    )


def _window_snippets(
    session: Session,
    terms: Sequence[str],
    ids: Sequence[int],
    *,
    postgres: bool,
    computed: bool = False,
) -> dict[int, tuple[str, str]]:
    """Cut a window around each text's earliest match in SQL; mark the terms in Python.
    `computed`: compute the texts from the calls' JSON (PostgreSQL, calls not indexed)."""
    if not ids:
        return {}
    if computed:
        prompt, response = _computed_texts()
        texts = select(RawCall.id, prompt.label("t0"), response.label("t1")).where(
            RawCall.id.in_(ids)
        )
    else:
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
