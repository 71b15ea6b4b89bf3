"""Bulk insert throughput: calls per second through `RawCallRepository.add_many`.

    .venv/bin/python bench/insert_bench.py                    # SQLite and PostgreSQL
    .venv/bin/python bench/insert_bench.py --db sqlite --rows 50000 --chunk 5000

Calls are made by `bench/corpus.py` beforehand (generation is not timed), then inserted
into a fresh database (a SQLite file under /work/bench-data, or a throwaway PostgreSQL
database ``sqllm_bench_insert_*``) in transactions of `--chunk` calls, the way a bulk
load or the batch recorder writes them. Three ways are measured:

- ``deferred``: ``add_many(..., defer_search_index=True)`` - the calls, their hourly
  rollups and sorted latencies in the transaction; the search text is left to the
  catch-up pass (the bulk-load path; the issue's target is for this one);
- ``catch-up``: `search_index.catch_up` indexing what ``deferred`` left (one process);
- ``synchronous``: ``add_many(...)``, search indexing inside each transaction.

Besides wall time (noisy on a shared machine) it reports CPU seconds of this process and,
for PostgreSQL, of the server backend (from /proc), whose sum is what an idle machine
would need. Each way runs `--rounds` times on a fresh database; medians are shown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    DATA_DIR,
    PG_ADMIN_URL,
    PG_PREFIX,
    drop_database,
    ensure_database,
    load_average,
    machine_facts,
    markdown_table,
)
from corpus import CallGenerator
from sqlalchemy import text
from sqlalchemy.engine import make_url

from study_query_llm.db import migrate, search_index
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine


def backend_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a local process (a PostgreSQL backend), or 0."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fresh_url(kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{DATA_DIR / f'insert-{uuid.uuid4().hex[:8]}.db'}"
    name = f"{PG_PREFIX}insert_{uuid.uuid4().hex[:8]}"
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def run(
    url: str, chunks: list[list[dict[str, Any]]], write: Callable[[Any, list], None]
) -> tuple[float, float, float]:
    """Insert every chunk with `write(uow, calls)`; (wall s, client CPU s, server CPU s)."""
    engine = get_engine(url)
    wall = client = server = 0.0
    for calls in chunks:
        with UnitOfWork(engine, write=True) as uow:
            pid = None
            if engine.dialect.name == "postgresql":
                pid = uow.session.scalar(text("SELECT pg_backend_pid()"))
            s0, c0, w0 = backend_cpu_s(pid), time.process_time(), time.perf_counter()
            write(uow, calls)
            uow.commit()
            wall += time.perf_counter() - w0
            client += time.process_time() - c0
            server += backend_cpu_s(pid) - s0
    return wall, client, server


def catch_up(url: str) -> tuple[float, float, float]:
    engine = get_engine(url)
    with engine.connect() as conn:
        pid = (
            conn.scalar(text("SELECT pg_backend_pid()"))
            if engine.dialect.name == "postgresql"
            else None
        )
    # catch_up opens its own sessions; on PostgreSQL the pool hands back that connection.
    s0, c0, w0 = backend_cpu_s(pid), time.process_time(), time.perf_counter()
    search_index.catch_up(engine)
    return time.perf_counter() - w0, time.process_time() - c0, backend_cpu_s(pid) - s0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--rows", type=int, default=50_000, help="calls per run (50,000)")
    parser.add_argument("--chunk", type=int, default=5_000, help="calls per transaction")
    parser.add_argument("--rounds", type=int, default=3, help="runs per way (median shown)")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument(
        "--calls-per-day",
        type=float,
        default=1_000_000 / 30,
        help="time density of the calls (default: 1,000,000 calls in 30 days)",
    )
    args = parser.parse_args(argv)

    print("## insert_bench.py")
    for line in machine_facts():
        print(f"- {line}")
    print(f"- {args.rows:,} calls per run in transactions of {args.chunk:,}, {args.rounds} runs")
    print()
    generator = CallGenerator(args.rows, seed=args.seed, days=args.rows / args.calls_per_day)
    chunks = [chunk.calls for chunk in generator.chunks(args.chunk)]
    text_chars = (
        sum(
            len(str(c["request_json"])) + len(str(c["response_json"] or ""))
            for chunk in chunks
            for c in chunk
        )
        / args.rows
    )
    print(f"(about {text_chars:,.0f} characters of request and response JSON per call)\n")

    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    rows = []
    for kind in kinds:
        results: dict[str, list[tuple[float, float, float]]] = {
            "deferred": [],
            "catch-up": [],
            "synchronous": [],
        }
        load_start = load_average()
        for _ in range(args.rounds):
            for way in ("deferred", "synchronous"):
                url = fresh_url(kind)
                ensure_database(url)
                migrate.upgrade(url)
                try:
                    defer = way == "deferred"
                    results[way].append(
                        run(
                            url,
                            chunks,
                            lambda uow, calls, defer=defer: uow.calls.add_many(
                                calls, defer_search_index=defer
                            ),
                        )
                    )
                    if defer:
                        results["catch-up"].append(catch_up(url))
                finally:
                    dispose_engine(url)
                    drop_database(url)
        load_end = load_average()
        for way, samples in results.items():
            wall = statistics.median(s[0] for s in samples)
            client = statistics.median(s[1] for s in samples)
            server = statistics.median(s[2] for s in samples)
            rows.append(
                [
                    kind,
                    way,
                    f"{args.rows / wall:,.0f}",
                    f"{args.rows / (client + server):,.0f}",
                    f"{wall:.1f}",
                    f"{client:.1f}",
                    f"{server:.1f}" if kind == "postgres" else "–",
                    f"{load_start} → {load_end}",
                ]
            )
    print(
        markdown_table(
            [
                "database",
                "way",
                "calls/s (wall)",
                "calls/s (CPU)",
                "wall s",
                "client CPU s",
                "server CPU s",
                "load avg start → end",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
