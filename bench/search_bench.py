"""Full-text search latency on a big database, against an unindexed LIKE scan of the same rows.

    .venv/bin/python bench/search_bench.py                 # the default SQLite and PostgreSQL DBs
    .venv/bin/python bench/search_bench.py --db sqlite --common the --rare quokka

For each term, `StudyService.search` (what the Search tab calls, with its default of 100
results and no filters) runs once untimed and then `--runs` times; the median is the
figure. The baseline is what searching without the index costs: one pass over every
call's text with LIKE (SQLite: over the stored request and response JSON, the text the
search index is built from; PostgreSQL: ILIKE over the stored prompt and response text
with index scans switched off), counting the matches. The ratio is baseline / search.
The common word matches a large share of all calls; the rare substrings only a few
(the generator puts "quokka" in about 1 call of 10,000, and ticket numbers like "ticket
#A1234" in a few). `ticket #A` unquoted is two terms, one too short for trigrams: the
calls matching "ticket" are scanned for "#A" (the hard case; shown separately).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from _common import (
    add_db_argument,
    chosen_urls,
    load_average,
    markdown_table,
    print_header,
    show_url,
)
from sqlalchemy import text

from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.search import like_pattern, search_terms
from study_query_llm.services.study import StudyService


def like_scan(engine: Any, term: str) -> tuple[float, int]:
    """(seconds, matches) of counting the calls whose text contains every term of `term`
    (as the search splits it), unindexed."""
    terms = search_terms(term)
    params = {f"p{i}": like_pattern(t) for i, t in enumerate(terms)}
    with UnitOfWork(engine) as uow:
        session = uow.session
        if engine.dialect.name == "postgresql":
            session.execute(text("SET LOCAL enable_bitmapscan = off"))
            session.execute(text("SET LOCAL enable_indexscan = off"))
            where = " AND ".join(
                f"(prompt_text ILIKE :{p} OR response_text ILIKE :{p})" for p in params
            )
            sql = f"SELECT count(*) FROM raw_call_search_text WHERE {where}"
        else:
            where = " AND ".join(
                f"(request_json LIKE :{p} ESCAPE '\\' OR response_json LIKE :{p} ESCAPE '\\')"
                for p in params
            )
            sql = f"SELECT count(*) FROM raw_calls WHERE {where}"
        start = time.perf_counter()
        matches = int(session.scalar(text(sql), params) or 0)
        return time.perf_counter() - start, matches


def bench(url: str, terms: list[tuple[str, str]], runs: int, limit: int) -> list[list[Any]]:
    engine = get_engine(url)
    study = StudyService(engine)
    with UnitOfWork(engine) as uow:
        total = int(uow.session.scalar(text("SELECT count(*) FROM raw_calls")) or 0)
    print(f"### {show_url(url)}: {total:,} calls\n")
    rows = []
    for kind, term in terms:
        load = load_average()
        first_start = time.perf_counter()
        hits = study.search(term, CallFilters(), limit)
        first = time.perf_counter() - first_start
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            hits = study.search(term, CallFilters(), limit)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        scan_s, matches = like_scan(engine, term)
        rows.append(
            [
                kind,
                f"`{term}`",
                f"{matches:,} ({matches / max(total, 1):.1%})",
                f"{len(hits):,}",
                f"{first * 1000:,.0f}",
                f"**{median * 1000:,.0f}**",
                f"{scan_s * 1000:,.0f}",
                f"{scan_s / median:,.0f}×",
                load,
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    dispose_engine(url)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_db_argument(parser)
    parser.add_argument("--common", action="append", help="common word(s) (default: the)")
    parser.add_argument(
        "--rare",
        action="append",
        help='rare substring(s) (default: quokka, "ticket #A" as a phrase)',
    )
    parser.add_argument(
        "--mixed",
        action="append",
        help="words of which one is under 3 characters (default: ticket #A, unquoted)",
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs per term (median)")
    parser.add_argument("--limit", type=int, default=100, help="results (the tab's default)")
    args = parser.parse_args(argv)
    urls = chosen_urls(args.db)
    if not urls:
        print("error: no benchmark database yet: run bench/generate.py first", file=sys.stderr)
        return 2
    terms = [("common word", t) for t in (args.common or ["the"])]
    terms += [("rare substring", t) for t in (args.rare or ["quokka", '"ticket #A"'])]
    terms += [("word + 2-char word", t) for t in (args.mixed or ["ticket #A"])]
    print_header(
        "search_bench.py",
        f"{args.runs} timed runs per term after one untimed run; {args.limit} results",
    )
    for url in urls:
        rows = bench(url, terms, args.runs, args.limit)
        print()
        print(
            markdown_table(
                [
                    "kind",
                    "term",
                    "matching calls",
                    "hits shown",
                    "first ms",
                    "median ms",
                    "LIKE scan ms",
                    "scan / search",
                    "load avg",
                ],
                rows,
            )
        )
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
