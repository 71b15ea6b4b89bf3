"""Analytics-tab queries on a big database: median latency, and exactness against a recomputation.

    .venv/bin/python bench/query_bench.py                  # the default SQLite and PostgreSQL DBs
    .venv/bin/python bench/query_bench.py --db sqlite --runs 7
    .venv/bin/python bench/query_bench.py --db sqlite:////work/bench-data/small.db

Every `StudyService` call the Analytics tab makes on a refresh is timed (`--runs` times
after one untimed run, whose time is reported as "first"; the median is the figure, each
run computing its answer: the answers kept with the rollup snapshot are dropped before
each, and "kept answer" is one run that recalls the kept answer instead): the
summary cards, the provider/model comparison (p50/p90/p99), the time series by hour per
provider and per model (calls, failure rate, tokens, cost, latency percentiles), the
latency sample for the box plot, the first page of recent calls and the count for its
pager, and the sidebar's provider/model choices. Each runs with the dashboard's default
filters (everything) and with a narrowed set: the last 7 days, from and to odd minutes
(partial first and last hours), three providers, successful calls only.

Each result is then checked against a full recomputation that does not touch the rollups:
the same aggregates in plain SQL over `raw_calls` (``use_rollups=False``: PostgreSQL's
``percentile_cont``, SQLite's rank interpolation), and plain ``count(*)``, ``ORDER BY ...
LIMIT`` and ``row_number()`` queries for the rest. Counts, sums of integers, keys and
percentiles must be identical; floating-point sums and means (latency mean, cost) may
differ only by the order of addition (relative difference at most 1e-9; the largest
seen is reported). A failed check makes the script exit with status 1.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pandas as pd
from _common import (
    add_db_argument,
    chosen_urls,
    load_average,
    markdown_table,
    print_header,
    show_url,
)
from sqlalchemy import func, select, text

from study_query_llm.db import aggregates, rollups
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import RawCall
from study_query_llm.services.study import STAT_COLUMNS, StudyService, summary_row

FLOAT_TOLERANCE = 1e-9
EXACT_FLOATS = ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "failure_rate", "latency_ms")
PAGE_SIZE = 50  # the Analytics tab's page
SAMPLES = 500  # the Analytics tab's default latency sample per provider/model


@dataclass
class Check:
    ok: bool
    detail: str


def compare_frames(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> Check:
    """Exact equality, except relative 1e-9 for floating sums and means."""
    if list(got.columns) != list(want.columns):
        return Check(False, f"columns differ: {list(got.columns)} vs {list(want.columns)}")
    if len(got) != len(want):
        return Check(False, f"{len(got)} rows vs {len(want)} rows")
    got = got.reset_index(drop=True)
    want = want.reset_index(drop=True)
    worst = 0.0
    for column in got.columns:
        for i, (a, b) in enumerate(zip(got[column], want[column], strict=True)):
            if _missing(a) and _missing(b):
                continue
            if isinstance(a, float) or isinstance(b, float):
                if _missing(a) or _missing(b):
                    return Check(False, f"row {i} {column}: {a!r} vs {b!r}")
                a, b = float(a), float(b)
                if column in EXACT_FLOATS or column in keys:
                    if a != b:
                        return Check(False, f"row {i} {column}: {a!r} != {b!r}")
                    continue
                scale = max(abs(a), abs(b))
                diff = abs(a - b) / scale if scale else 0.0
                worst = max(worst, diff)
                if diff > FLOAT_TOLERANCE:
                    return Check(False, f"row {i} {column}: {a!r} vs {b!r}")
            elif a != b:
                return Check(False, f"row {i} {column}: {a!r} != {b!r}")
    return Check(True, f"exact (float sums within {worst:.1e})" if worst else "exact")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# --- references: the same answers without the rollups ------------------------------------


def ref_summary(engine: Any, filters: CallFilters) -> dict[str, Any]:
    with UnitOfWork(engine) as uow:
        stats = aggregates.summary(uow.session, filters, use_rollups=False)
        row = uow.session.execute(
            select(
                func.count(func.distinct(RawCall.provider)),
                func.count(func.distinct(RawCall.provider + "/" + RawCall.model)),
            ).where(*filters.conditions())
        ).one()
    return summary_row(stats, int(row[0]), int(row[1]))


def ref_compare(engine: Any, filters: CallFilters) -> pd.DataFrame:
    with UnitOfWork(engine) as uow:
        rows = [
            s.as_dict()
            for s in aggregates.by_provider_model(uow.session, filters, use_rollups=False)
        ]
    frame = pd.DataFrame(rows, columns=["provider", "model", *STAT_COLUMNS])
    frame.insert(2, "target", frame["provider"] + " / " + frame["model"])
    return frame


def ref_series(engine: Any, filters: CallFilters, by: str) -> pd.DataFrame:
    with UnitOfWork(engine) as uow:
        rows = [
            s.as_dict()
            for s in aggregates.time_buckets(uow.session, filters, "hour", by, use_rollups=False)
        ]
    frame = pd.DataFrame(rows)[["bucket", by, *STAT_COLUMNS]]
    frame["bucket"] = pd.to_datetime(frame["bucket"], utc=True)
    return frame


def ref_samples(engine: Any, filters: CallFilters) -> pd.DataFrame:
    ranked = (
        select(
            RawCall.provider,
            RawCall.model,
            RawCall.latency_ms,
            func.row_number()
            .over(
                partition_by=(RawCall.provider, RawCall.model),
                order_by=(RawCall.created_at.desc(), RawCall.id.desc()),
            )
            .label("n"),
        )
        .where(*filters.conditions(), RawCall.latency_ms.is_not(None), RawCall.status == "success")
        .subquery()
    )
    with UnitOfWork(engine) as uow:
        rows = uow.session.execute(
            select(ranked.c.provider, ranked.c.model, ranked.c.latency_ms).where(
                ranked.c.n <= SAMPLES
            )
        ).all()
    return _sorted_samples(pd.DataFrame(rows, columns=["provider", "model", "latency_ms"]))


def _sorted_samples(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame[["provider", "model", "latency_ms"]]
    return frame.sort_values(["provider", "model", "latency_ms"], kind="stable").reset_index(
        drop=True
    )


def ref_page(engine: Any, filters: CallFilters) -> list[int]:
    with UnitOfWork(engine) as uow:
        return list(
            uow.session.scalars(
                select(RawCall.id)
                .where(*filters.conditions())
                .order_by(RawCall.created_at.desc(), RawCall.id.desc())
                .limit(PAGE_SIZE)
            )
        )


def ref_count(engine: Any, filters: CallFilters) -> int:
    with UnitOfWork(engine) as uow:
        return int(
            uow.session.scalar(
                select(func.count()).select_from(RawCall).where(*filters.conditions())
            )
        )


def ref_facets(engine: Any, filters: CallFilters) -> dict[str, list[str]]:
    with UnitOfWork(engine) as uow:
        providers = uow.session.scalars(
            select(RawCall.provider)
            .where(*filters.conditions())
            .distinct()
            .order_by(RawCall.provider)
        ).all()
        models = uow.session.scalars(
            select(RawCall.model).where(*filters.conditions()).distinct().order_by(RawCall.model)
        ).all()
    return {"providers": list(providers), "models": list(models)}


# --- the benchmark -------------------------------------------------------------------------


@dataclass
class Query:
    name: str
    run: Callable[[], Any]
    check: Callable[[Any], Check]


def queries(study: StudyService, engine: Any, filters: CallFilters) -> list[Query]:
    def check_summary(got: dict[str, Any]) -> Check:
        want = ref_summary(engine, filters)
        return compare_frames(pd.DataFrame([got]), pd.DataFrame([want]), [])

    def check_series(by: str) -> Callable[[pd.DataFrame], Check]:
        return lambda got: compare_frames(got, ref_series(engine, filters, by), ["bucket", by])

    return [
        Query("summary cards", lambda: study.summary(filters), check_summary),
        Query(
            "compare p50/p90/p99",
            lambda: study.compare(filters),
            lambda got: compare_frames(got, ref_compare(engine, filters), ["provider", "model"]),
        ),
        Query(
            "series hour × provider",
            lambda: study.time_series(filters, "hour", "provider"),
            check_series("provider"),
        ),
        Query(
            "series hour × model (failure rate)",
            lambda: study.time_series(filters, "hour", "model"),
            check_series("model"),
        ),
        Query(
            "latency sample (500/model)",
            lambda: study.latency_samples(filters, SAMPLES),
            lambda got: compare_frames(
                _sorted_samples(got), ref_samples(engine, filters), ["provider", "model"]
            ),
        ),
        Query(
            "recent calls, page 1",
            lambda: study.recent_calls(filters, PAGE_SIZE),
            lambda got: Check(
                list(got.frame["id"]) == ref_page(engine, filters), "same ids in order"
            ),
        ),
        Query(
            "count (pager)",
            lambda: study.count(filters),
            lambda got: Check(got == ref_count(engine, filters), f"{got:,}"),
        ),
        Query(
            "facets (sidebar)",
            lambda: study.facets(filters),
            lambda got: Check(got == ref_facets(engine, filters), "same providers and models"),
        ),
    ]


def narrowed(engine: Any) -> CallFilters:
    """The last 7 days from and to odd minutes, three providers, successes only."""
    with UnitOfWork(engine) as uow:
        newest = uow.session.scalar(select(func.max(RawCall.created_at)))
        providers = uow.session.scalars(
            select(RawCall.provider).distinct().order_by(RawCall.provider)
        ).all()
    end = newest.replace(second=0, microsecond=0) - timedelta(minutes=3)
    return CallFilters(
        start=end - timedelta(days=7, minutes=-17),
        end=end,
        providers=tuple(providers[:3]),
        status="success",
    )


def bench(url: str, runs: int, check: bool) -> tuple[list[list[Any]], bool]:
    engine = get_engine(url)
    study = StudyService(engine)
    with UnitOfWork(engine) as uow:
        total = uow.session.scalar(text("SELECT count(*) FROM raw_calls"))
    print(f"### {show_url(url)}: {total:,} calls\n")
    rows: list[list[Any]] = []
    ok = True
    for label, filters in (("all", CallFilters()), ("narrowed", narrowed(engine))):
        if label == "narrowed":
            print(f"narrowed filters: {filters}\n")
        for query in queries(study, engine, filters):
            load = load_average()
            start = time.perf_counter()
            result = query.run()  # the first run (cold caches)
            first = time.perf_counter() - start
            start = time.perf_counter()
            query.run()  # the answer kept with the rollup snapshot, where there is one
            kept = time.perf_counter() - start
            times = []
            for _ in range(runs):
                rollups.MIRROR.forget_answers()  # time computing the answer, not recalling it
                start = time.perf_counter()
                result = query.run()
                times.append(time.perf_counter() - start)
            median = statistics.median(times) * 1000
            outcome = Check(True, "not checked")
            if check:
                started = time.perf_counter()
                outcome = query.check(result)
                reference_s = time.perf_counter() - started
                outcome.detail += f" (recomputed in {reference_s:.1f} s)"
            ok &= outcome.ok
            rows.append(
                [
                    query.name,
                    label,
                    f"{first * 1000:,.0f}",
                    f"**{median:,.0f}**",
                    f"{max(times) * 1000:,.0f}",
                    f"{kept * 1000:,.0f}",
                    ("pass: " if outcome.ok else "FAIL: ") + outcome.detail,
                    load,
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    dispose_engine(url)
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_db_argument(parser)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per query (median)")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the recomputation (timings only)"
    )
    args = parser.parse_args(argv)
    urls = chosen_urls(args.db)
    if not urls:
        print("error: no benchmark database yet: run bench/generate.py first", file=sys.stderr)
        return 2
    print_header("query_bench.py", f"{args.runs} timed runs per query after one untimed first run")
    all_ok = True
    for url in urls:
        rows, ok = bench(url, args.runs, not args.no_check)
        all_ok &= ok
        print()
        print(
            markdown_table(
                [
                    "query",
                    "filters",
                    "first ms",
                    "median ms",
                    "max ms",
                    "kept answer ms",
                    "exact?",
                    "load avg",
                ],
                rows,
            )
        )
        print()
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
