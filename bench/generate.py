"""Fill a benchmark database with N realistic synthetic calls through the repositories' bulk path.

    .venv/bin/python bench/generate.py --db sqlite            # 1,000,000 calls, /work/bench-data
    .venv/bin/python bench/generate.py --db postgres          # 5,000,000 calls, sqllm_bench_5m
    .venv/bin/python bench/generate.py --rows 100000 --db sqlite:////work/bench-data/small.db
    .venv/bin/python bench/generate.py --db postgres --drop   # delete the database again

What the calls look like is described in `bench/corpus.py` (several providers and models,
lognormal latencies, ~3% failures with error_json, batch/experiment/label groups, prompts
and answers of realistic length, some non-English, over 30 days ending now). Each chunk of
`--chunk` calls is one transaction: `RawCallRepository.add_many` (so the rollups and
every trigger are maintained exactly as in production), the new groups, their members
(`insert_rows`, the same batched path) and, with `--with-v1`, the matching v1
`inference_runs` rows. Like any bulk load, it defers search indexing
(``defer_search_index=True``) and then runs `search_index.catch_up` in `--index-workers`
processes; `--sync-search` indexes inside the insert transactions instead. Prints a
progress bar, then the time spent generating, inserting and indexing, with rows/second.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from datetime import UTC, datetime
from typing import Any

from _common import (
    DEFAULT_ROWS,
    backend,
    database_exists,
    database_size,
    drop_database,
    ensure_database,
    load_average,
    machine_facts,
    markdown_table,
    resolve_url,
    show_url,
)
from corpus import CallGenerator
from sqlalchemy import func, select
from tqdm import tqdm

from study_query_llm.db import migrate, search_index
from study_query_llm.db.bulk import insert_rows
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.models_v2 import GroupMember, RawCall


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--db",
        default="sqlite",
        help="database URL, or 'sqlite' / 'postgres' for the default benchmark databases",
    )
    parser.add_argument(
        "--rows", type=int, help="calls to make (default: 1,000,000 SQLite, 5,000,000 PostgreSQL)"
    )
    parser.add_argument("--seed", type=int, default=8, help="random seed (default 8)")
    parser.add_argument("--days", type=float, default=30.0, help="days of history (default 30)")
    parser.add_argument(
        "--end", help="time of the newest call, ISO 8601 UTC (default: now, to the second)"
    )
    parser.add_argument("--chunk", type=int, default=5000, help="calls per transaction")
    parser.add_argument("--with-v1", action="store_true", help="also write v1 inference_runs")
    parser.add_argument(
        "--sync-search",
        action="store_true",
        help="index search text in the insert transactions instead of catching up after",
    )
    parser.add_argument(
        "--index-workers",
        type=int,
        help="processes indexing the search backlog (default: 2 PostgreSQL, 1 SQLite)",
    )
    parser.add_argument(
        "--append", action="store_true", help="add to a database that already has calls"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="drop the database first, then generate"
    )
    parser.add_argument("--drop", action="store_true", help="only drop the database, then exit")
    return parser.parse_args(argv)


def existing_calls(url: str) -> int:
    with UnitOfWork(get_engine(url)) as uow:
        return int(uow.session.scalar(select(func.count()).select_from(RawCall)) or 0)


def insert_chunk(
    url: str, chunk: Any, group_ids: dict[str, int], positions: dict[str, int], *, defer: bool
) -> tuple[int, int]:
    """One transaction: the calls, new groups, memberships and v1 rows. (calls, members)"""
    with UnitOfWork(get_engine(url), write=True) as uow:
        call_ids = uow.calls.add_many(chunk.calls, defer_search_index=defer)
        for key, (group_type, name, description) in chunk.new_groups.items():
            group_ids[key] = uow.groups.create(group_type, name, description=description).id
        members = []
        for index, key, role in chunk.memberships:
            position = positions.get(key, 0)
            positions[key] = position + 1
            members.append(
                {
                    "group_id": group_ids[key],
                    "call_id": call_ids[index],
                    "position": position,
                    "role": role,
                    "created_at": chunk.calls[index]["created_at"],
                }
            )
        insert_rows(uow.session, GroupMember, members)
        if chunk.runs:
            uow.runs.add_many(chunk.runs)
        uow.commit()
    return len(call_ids), len(members)


def _index_worker(url: str) -> int:
    return search_index.catch_up(get_engine(url))


def catch_up(url: str, workers: int) -> tuple[float, int]:
    """Index the search backlog with `workers` processes; (seconds, calls indexed)."""
    with UnitOfWork(get_engine(url)) as uow:
        pending = search_index.pending(uow.session)
    if not pending:
        return 0.0, 0
    dispose_engine(url)  # no pooled connection may cross into the worker processes
    print(f"indexing the search text of {pending:,} calls with {workers} process(es)...")
    started = time.perf_counter()
    if workers <= 1:
        indexed = search_index.catch_up(get_engine(url))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            indexed = sum(pool.map(_index_worker, [url] * workers))
    return time.perf_counter() - started, indexed


def analyze(url: str) -> None:
    """Refresh the query planner's statistics after a bulk load (SQLite keeps none until
    asked; PostgreSQL's autovacuum would get there, later)."""
    engine = get_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = resolve_url(args.db)
    kind = backend(url)
    if args.drop or args.fresh:
        drop_database(url)
        print(f"dropped {show_url(url)}")
        if args.drop:
            return 0
    rows = args.rows if args.rows is not None else DEFAULT_ROWS[kind]
    end = (
        datetime.fromisoformat(args.end).astimezone(UTC)
        if args.end
        else datetime.now(UTC).replace(microsecond=0)
    )
    print("## generate.py")
    for line in machine_facts():
        print(f"- {line}")
    print(f"- database: {show_url(url)}")
    print(f"- rows: {rows:,}, seed {args.seed}, {args.days:g} days ending {end:%Y-%m-%d %H:%M:%S}")
    print()

    ensure_database(url)
    migrate.upgrade(url)
    if not args.append and database_exists(url) and existing_calls(url):
        print(
            f"error: {show_url(url)} already has calls; pass --append to add more or "
            "--fresh to start over",
            file=sys.stderr,
        )
        return 2

    tag = f" s{args.seed} {end:%Y%m%dT%H%M%S}"
    generator = CallGenerator(
        rows, seed=args.seed, days=args.days, end=end, tag=tag, with_v1=args.with_v1
    )
    group_ids: dict[str, int] = {}
    positions: dict[str, int] = {}
    gen_s = insert_s = 0.0
    inserted = members = runs = 0
    load_start = load_average()
    started = time.perf_counter()
    with tqdm(total=rows, unit="call", unit_scale=True, smoothing=0.05) as bar:
        chunks = generator.chunks(args.chunk)
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            t1 = time.perf_counter()
            gen_s += t1 - t0
            if chunk is None:
                break
            n_calls, n_members = insert_chunk(
                url, chunk, group_ids, positions, defer=not args.sync_search
            )
            insert_s += time.perf_counter() - t1
            inserted += n_calls
            members += n_members
            runs += len(chunk.runs)
            bar.update(n_calls)
            bar.set_postfix(insert=f"{inserted / max(insert_s, 1e-9):,.0f}/s", refresh=False)
    analyze(url)  # queries run meanwhile get good plans
    workers = args.index_workers or (2 if kind == "postgresql" else 1)
    index_s, indexed = catch_up(url, workers)
    analyze(url)
    wall_s = time.perf_counter() - started
    load_end = load_average()
    size = database_size(url)
    dispose_engine(url)

    print()
    print(
        markdown_table(
            [
                "database",
                "calls",
                "group members",
                "v1 rows",
                "generate s",
                "insert s",
                "insert calls/s",
                "search index s",
                "index calls/s",
                "overall calls/s",
                "size",
                "load avg start → end",
            ],
            [
                [
                    kind,
                    f"{inserted:,}",
                    f"{members:,}",
                    f"{runs:,}",
                    f"{gen_s:.1f}",
                    f"{insert_s:.1f}",
                    f"{inserted / max(insert_s, 1e-9):,.0f}",
                    f"{index_s:.1f}" if indexed else "in insert",
                    f"{indexed / max(index_s, 1e-9):,.0f}" if indexed else "–",
                    f"{inserted / max(wall_s, 1e-9):,.0f}",
                    size,
                    f"{load_start} → {load_end}",
                ]
            ],
        )
    )
    labels = len(group_ids) - generator.batches_made - generator.experiments_made
    print(
        f"\n{len(group_ids):,} groups ({generator.batches_made:,} batches, "
        f"{generator.experiments_made:,} experiments, {labels} labels)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
