"""Rollup-backed aggregates equal the same aggregates over `raw_calls`, on both databases.

Whichever way calls arrive (the bulk path, plain INSERTs, concurrent writers, rows that
were there before the rollups existed) and whatever the filters, the answers from the
hourly rollups must be exactly the base-table answers: counts, integer sums, keys and
percentiles identical; floating-point sums and means equal up to the order of addition.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, func, select, text

from study_query_llm.db import aggregates, migrate, rollup_read, rollups, search_index
from study_query_llm.db.aggregates import CallStats
from study_query_llm.db.connection import UnitOfWork, get_engine, run_write
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import CallRollup, RawCall
from study_query_llm.db.records import NewCall
from study_query_llm.db.repositories.study import StudyQueries

T0 = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)  # a Monday, on the hour
TARGETS = [
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4o"),
    ("anthropic", "claude-haiku-4-5"),
    ("Zeta", "Model-B"),  # upper case: collation order must match the database's
    ("zeta", "model-a"),
]
STATUSES = ["success"] * 6 + ["failed", "timeout", "cancelled"]


def make_calls(n: int, seed: int, start: datetime = T0, hours: float = 30.0) -> list[NewCall]:
    """Calls over `hours` hours from `start`: several targets, statuses and modalities,
    some NULL latencies, tokens and costs, repeated latencies (ties), and calls exactly
    on hour boundaries."""
    rng = random.Random(seed)
    calls = []
    for i in range(n):
        provider, model = rng.choice(TARGETS)
        if i % 17 == 0:
            moment = start + timedelta(hours=rng.randrange(int(hours)))  # on the hour
        else:
            moment = start + timedelta(seconds=rng.uniform(0, hours * 3600))
        latency = (
            None if rng.random() < 0.08 else round(rng.lognormvariate(6, 1), rng.choice((0, 3)))
        )
        prompt_tokens = None if rng.random() < 0.1 else rng.randrange(1, 500)
        calls.append(
            NewCall(
                provider=provider,
                model=model,
                modality=rng.choice(["chat", "chat", "chat", "embedding", "completion"]),
                status=rng.choice(STATUSES),
                request_json={"messages": [{"role": "user", "content": f"question {i} {seed}"}]},
                response_json={"text": f"answer {i}"},
                latency_ms=latency,
                prompt_tokens=prompt_tokens,
                completion_tokens=None if prompt_tokens is None else rng.randrange(0, 900),
                total_tokens=None if prompt_tokens is None else rng.randrange(1, 1400),
                cost_usd=None if rng.random() < 0.2 else rng.random() / 1000,
                created_at=moment,
            )
        )
    return calls


def record(engine: Engine, calls: Sequence[NewCall], chunk: int = 97) -> None:
    for first in range(0, len(calls), chunk):
        run_write(engine, lambda uow, part=calls[first : first + chunk]: uow.calls.add_many(part))


def assert_same_stats(got: Sequence[CallStats], want: Sequence[CallStats]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for name in CallStats.__dataclass_fields__:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, float) and isinstance(y, float) and name in FLOAT_SUMS:
                assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), (name, x, y, a)
            else:
                assert x == y, (name, x, y, a)


# Floating-point sums and means: equal up to the order of addition. Everything else
# (counts, integer sums, percentiles, failure rates, keys) must be identical.
FLOAT_SUMS = {
    "cost_usd_sum",
    "latency_mean_ms",
    "prompt_tokens_mean",
    "completion_tokens_mean",
    "total_tokens_mean",
}


def filter_cases() -> list[CallFilters]:
    odd = T0 + timedelta(hours=3, minutes=17, seconds=5)
    return [
        CallFilters(),
        CallFilters(providers=("openai",)),
        CallFilters(models=("model-a", "Model-B")),
        CallFilters(status="success"),
        CallFilters(status="cancelled", modality="chat"),
        CallFilters(modality="embedding"),
        CallFilters(start=T0 + timedelta(hours=2), end=T0 + timedelta(hours=20)),  # aligned
        CallFilters(start=odd, end=odd + timedelta(hours=9, minutes=41)),  # partial hours
        CallFilters(start=odd, end=odd + timedelta(minutes=20)),  # inside one hour
        CallFilters(start=odd, end=odd + timedelta(minutes=50)),  # across one boundary
        CallFilters(start=odd),
        CallFilters(end=odd, providers=("zeta", "anthropic"), status="success"),
        CallFilters(start=odd, end=odd),  # empty
        CallFilters(start=T0 + timedelta(days=30)),  # nothing there
    ]


def check_everything(engine: Engine) -> None:
    """Every rollup-backed answer equals the base-table answer, for every filter case."""
    with UnitOfWork(engine) as uow:
        s = uow.session
        for filters in filter_cases():
            assert_same_stats(
                [aggregates.summary(s, filters)],
                [aggregates.summary(s, filters, use_rollups=False)],
            )
            assert_same_stats(
                aggregates.by_provider_model(s, filters),
                aggregates.by_provider_model(s, filters, use_rollups=False),
            )
            for bucket in ("hour", "day", "week"):
                for by in (None, "provider", "model"):
                    assert_same_stats(
                        aggregates.time_buckets(s, filters, bucket, by),
                        aggregates.time_buckets(s, filters, bucket, by, use_rollups=False),
                    )
            base_count = s.scalar(
                select(func.count()).select_from(RawCall).where(*filters.conditions())
            )
            assert rollup_read.count(s, filters) == base_count
            base_pairs = {
                (p, m)
                for p, m in s.execute(
                    select(RawCall.provider, RawCall.model).where(*filters.conditions()).distinct()
                )
            }
            assert rollup_read.keys(s, filters) == base_pairs
            facets = StudyQueries(s).facets(filters)
            assert facets["providers"] == list(
                s.scalars(
                    select(RawCall.provider)
                    .where(*filters.conditions())
                    .distinct()
                    .order_by(RawCall.provider)
                )
            )


@pytest.mark.parametrize("keyed_cells", [0, 10**6], ids=["cells-of-hours", "cells-by-key"])
def test_rollups_equal_the_base_table_for_every_filter(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, keyed_cells: int
) -> None:
    """Exact with either way of reading the touched cells' latencies on insert."""
    monkeypatch.setattr(rollups, "KEYED_CELLS", keyed_cells)
    record(engine, make_calls(1500, seed=1))
    check_everything(engine)
    with UnitOfWork(engine) as uow:  # the bulk path kept every cell's latencies current
        behind = uow.session.scalar(
            select(func.count())
            .select_from(CallRollup)
            .where(CallRollup.latencies_count != CallRollup.latency_count)
        )
    assert behind == 0


def test_new_calls_show_at_once_in_cached_answers(engine: Engine) -> None:
    record(engine, make_calls(400, seed=2))
    filters = CallFilters(providers=("openai",))
    with UnitOfWork(engine) as uow:
        before = aggregates.summary(uow.session, filters)  # fills the process-wide cache
    record(engine, make_calls(50, seed=3, start=T0 + timedelta(hours=2), hours=1))
    with UnitOfWork(engine) as uow:
        after = aggregates.summary(uow.session, filters)
        base = aggregates.summary(uow.session, filters, use_rollups=False)
    assert after.count > before.count
    assert_same_stats([after], [base])


def test_answers_are_kept_with_the_cells_they_were_computed_from(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions asking the same of the same cells share one computation (the percentiles
    over every latency); each gets its own dict; a new call starts over, exactly."""
    record(engine, make_calls(600, seed=5))
    filters = CallFilters(status="success")
    ask = (filters, ("provider",), "hour", aggregates.PERCENTILES)
    with UnitOfWork(engine) as uow:
        first = rollup_read.stats_columns(uow.session, *ask)
    assert first is not None
    assert first.pop("groups") == 4  # a caller may take entries out of its answer

    def computed_again(*_args: Any) -> None:
        raise AssertionError("computed again from the same cells")

    with monkeypatch.context() as patch, UnitOfWork(engine) as uow:
        patch.setattr(rollup_read, "_stats_columns", computed_again)
        second = rollup_read.stats_columns(uow.session, *ask)
    assert second is not None and second["groups"] == 4
    assert np.array_equal(second["latency_p90_ms"], first["latency_p90_ms"], equal_nan=True)
    with pytest.raises(ValueError, match="read-only"):
        second["count"][0] = 0

    record(engine, make_calls(30, seed=6, start=T0 + timedelta(hours=5), hours=1))
    with UnitOfWork(engine) as uow:
        third = rollup_read.stats_columns(uow.session, *ask)
        assert_same_stats(
            aggregates.by_provider_model(uow.session, filters),
            aggregates.by_provider_model(uow.session, filters, use_rollups=False),
        )
    assert third is not None and third["count"].sum() > second["count"].sum()


def test_rows_inserted_without_the_repository_still_count_exactly(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    record(engine, make_calls(300, seed=4))
    # A plain INSERT (another tool, a manual fix): the insert triggers roll it up, and
    # its cell's sorted latencies fall behind, so readers take them from raw_calls.
    with engine.begin() as conn:
        for i, latency in enumerate((1.5, 99999.0, None, 7.25)):
            conn.execute(
                RawCall.__table__.insert().values(
                    provider="openai",
                    model="gpt-4o",
                    modality="chat",
                    status="success",
                    request_json={"prompt": f"manual {i}"},
                    latency_ms=latency,
                    prompt_tokens=3,
                    cost_usd=0.5,
                    created_at=T0 + timedelta(hours=4, minutes=i),
                )
            )
    check_everything(engine)
    assert rollups.repair(engine) >= 1
    assert rollups.repair(engine) == 0
    check_everything(engine)


def test_group_filters_are_answered_from_the_base_table(engine: Engine) -> None:
    calls = make_calls(300, seed=5)
    with UnitOfWork(engine) as uow:
        ids = uow.calls.add_many(calls)
        group = uow.groups.create("experiment", "half")
        uow.groups.add_members(group.id, ids[::2])
        uow.commit()
    filters = CallFilters(group_id=group.id, status="success")
    with UnitOfWork(engine) as uow:
        assert rollup_read.plan(filters) is None
        summary = aggregates.summary(uow.session, filters)
        assert_same_stats([summary], [aggregates.summary(uow.session, filters, use_rollups=False)])
        assert summary.count == sum(1 for c in calls[::2] if c.status == "success")


def test_concurrent_writers_keep_the_rollups_exact(engine: Engine) -> None:
    batches = [make_calls(60, seed=100 + i, hours=3) for i in range(16)]  # same few hours
    errors: list[BaseException] = []

    def writer(mine: list[list[NewCall]]) -> None:
        try:
            for calls in mine:
                record(engine, calls, chunk=20)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(batches[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with UnitOfWork(engine) as uow:
        total = uow.session.scalar(select(func.sum(CallRollup.calls)))
        behind = uow.session.scalar(
            select(func.count())
            .select_from(CallRollup)
            .where(CallRollup.latencies_count != CallRollup.latency_count)
        )
    assert total == 16 * 60
    assert behind == 0
    check_everything(engine)


@pytest.mark.postgres
@pytest.mark.parametrize("n", [20, 150])  # a multi-row INSERT and a COPY
def test_each_batch_reaches_the_postgres_triggers_as_one_statement(pg_db_url: str, n: int) -> None:
    """The rollup trigger locks a statement's cells in key order, so writers cannot
    deadlock on them; a batch sent as one INSERT per row would lock them in input order."""
    engine = get_engine(pg_db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE statement_sizes (n integer)"))
        conn.execute(
            text(
                "CREATE FUNCTION note_statement_size() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN INSERT INTO statement_sizes SELECT count(*) FROM added; RETURN NULL; "
                "END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER note_statement_size AFTER INSERT ON raw_calls "
                "REFERENCING NEW TABLE AS added "
                "FOR EACH STATEMENT EXECUTE FUNCTION note_statement_size()"
            )
        )
    record(engine, make_calls(n, seed=12), chunk=n)
    with engine.connect() as conn:
        assert conn.scalars(text("SELECT n FROM statement_sizes")).all() == [n]
    check_everything(engine)


def test_cells_read_in_small_batches_give_the_same_answers(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cells are read a batch at a time (one batch of latency blobs in memory); the
    answers do not depend on where the batches split, including a cell whose latencies
    are behind and must be read from raw_calls in the middle of a batch."""
    monkeypatch.setattr(rollups, "ROWS_PER_BATCH", 7)
    record(engine, make_calls(400, seed=21))
    with engine.begin() as conn:  # a plain INSERT: its cell's latencies fall behind
        conn.execute(RawCall.__table__.insert(), [make_calls(1, seed=22)[0].row()])
    with UnitOfWork(engine) as uow:
        cells = uow.session.scalar(select(func.count()).select_from(CallRollup))
    assert cells > 3 * 7  # several batches, and a last one that is not full
    check_everything(engine)


def test_latencies_read_into_one_array_whatever_its_first_size(engine: Engine) -> None:
    """A read copies each cell's latencies into one array sized from the hours' totals;
    if more arrived meanwhile (or the size was not known) the array grows: same cells,
    same latencies, same offsets either way."""
    record(engine, make_calls(500, seed=23))
    with UnitOfWork(engine) as uow:
        total = rollups._totals(uow.session)[1]
        reads = [rollups._read_hours(uow.session, None, size) for size in (total, 0, total // 3)]
    exact = reads[0]
    assert len(exact.values) == total
    for other in reads[1:]:
        assert np.array_equal(other.values, exact.values)
        assert np.array_equal(other.starts, exact.starts)
        assert np.array_equal(other.lengths, exact.lengths)
        assert not other.values.flags.writeable


def test_queries_started_together_on_a_cold_cache_read_the_cells_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several sessions asking at once (a dashboard tab's queries, the start-up warm-up)
    share one read of the cells instead of each reading all of them."""
    record(engine, make_calls(300, seed=24))
    rollups.MIRROR.clear()
    reads: list[Any] = []
    read_hours = rollups._read_hours

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(args[1])
        return read_hours(*args, **kwargs)

    monkeypatch.setattr(rollups, "_read_hours", counted)
    start = threading.Barrier(4)

    def ask() -> int:
        with UnitOfWork(engine) as uow:
            start.wait()
            return len(rollups.MIRROR.snapshot(uow.session))

    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: ask(), range(4)))
    assert reads == [None]  # one full read
    assert len(set(sizes)) == 1 and sizes[0] > 0


def test_reads_never_mix_two_databases(tmp_path: Any) -> None:
    """Two databases with identical cell ids and counts but different latencies: the
    process-wide cache keeps them apart."""
    urls = [f"sqlite:///{tmp_path / name}" for name in ("a.db", "b.db")]
    answers = []
    for url, scale in zip(urls, (1.0, 3.0), strict=True):
        migrate.upgrade(url)
        calls = [
            NewCall(
                provider="mock",
                model="m",
                request_json={"prompt": str(i)},
                latency_ms=float(i) * scale,
                created_at=T0 + timedelta(minutes=i),
            )
            for i in range(1, 11)
        ]
        record(get_engine(url), calls)
        with UnitOfWork(get_engine(url)) as uow:
            answers.append(aggregates.summary(uow.session, CallFilters()).latency_p50_ms)
    assert answers == [5.5, 16.5]


def test_migration_rolls_up_calls_recorded_before_it(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, "0004_legacy_import")
    engine = get_engine(empty_db_url)
    rows = [c.row() for c in make_calls(200, seed=6)]
    with engine.begin() as conn:  # written the way revision 0004's code wrote them
        conn.execute(RawCall.__table__.insert(), rows)
    migrate.upgrade(empty_db_url)
    with UnitOfWork(engine) as uow:
        behind = uow.session.scalar(
            select(func.count())
            .select_from(CallRollup)
            .where(CallRollup.latencies_count != CallRollup.latency_count)
        )
    assert behind == 0
    check_everything(engine)
    # and back: the downgrade leaves raw_calls and its search index as 0004 had them
    migrate.downgrade(empty_db_url, "0004_legacy_import")
    indexed = (
        "SELECT count(*) FROM raw_call_search_text WHERE prompt_text LIKE '%question%'"
        if engine.dialect.name == "postgresql"
        else "SELECT count(*) FROM raw_calls_fts WHERE raw_calls_fts MATCH 'question'"
    )
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM raw_calls")) == 200
        assert conn.scalar(text(indexed)) == 200


def test_deferred_search_indexing_still_finds_everything(engine: Engine) -> None:
    now = [
        NewCall(
            provider="mock",
            model="m",
            request_json={"messages": [{"role": "user", "content": f"platypus number n{i:03d}"}]},
            response_json={"text": f"reply {i}"},
            created_at=T0 + timedelta(seconds=i),
        )
        for i in range(30)
    ]
    with UnitOfWork(engine) as uow:
        deferred = uow.calls.add_many(now[:20], defer_search_index=True)
        indexed = uow.calls.add_many(now[20:])
        uow.commit()
    with UnitOfWork(engine) as uow:
        assert search_index.pending(uow.session) == 20
        hits = uow.calls.search("platypus", limit=100)
        assert {h.call_id for h in hits} == set(deferred) | set(indexed)
        assert all("[[platypus]]" in h.prompt_snippet for h in hits)
        only = uow.calls.search("n007")
        assert [h.call_id for h in only] == [deferred[7]]
    assert search_index.catch_up(engine) == 20
    with UnitOfWork(engine) as uow:
        assert search_index.pending(uow.session) == 0
        hits = uow.calls.search("platypus", limit=100)
        assert {h.call_id for h in hits} == set(deferred) | set(indexed)
    assert search_index.catch_up(engine) == 0


def test_search_ranks_the_most_recent_matches(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from study_query_llm.db import search

    with UnitOfWork(engine) as uow:
        ids = uow.calls.add_many(
            [
                NewCall(
                    provider="mock",
                    model="m",
                    request_json={"prompt": "wombat " * (1 + (i % 3))},
                    created_at=T0 + timedelta(seconds=i),
                )
                for i in range(12)
            ]
        )
        uow.commit()
    monkeypatch.setattr(search, "RANK_WINDOW", 5)
    with UnitOfWork(engine) as uow:
        hits = uow.calls.search("wombat", limit=3)
        assert len(hits) == 3
        assert {h.call_id for h in hits} <= set(ids[-5:])  # the best of the newest five
        assert [h.rank for h in hits] == sorted((h.rank for h in hits), reverse=True)
        assert len(uow.calls.search("wombat", limit=12)) == 12  # never fewer than asked


def test_catch_up_command_indexes_deferred_text_and_repairs_rollups(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from study_query_llm.cli import main as cli_main

    url = f"sqlite:///{tmp_path / 'bulk.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", url)
    migrate.upgrade(url)
    engine = get_engine(url)
    calls = make_calls(40, seed=9)
    with UnitOfWork(engine) as uow:
        uow.calls.add_many(calls, defer_search_index=True)
        uow.commit()
    with engine.begin() as conn:  # a plain INSERT: its cell's latencies fall behind
        conn.execute(
            RawCall.__table__.insert().values(
                provider="openai",
                model="gpt-4o",
                modality="chat",
                status="success",
                request_json={"prompt": "wombat by hand"},
                latency_ms=12.5,
                created_at=T0,
            )
        )

    assert cli_main(["db", "catch-up"]) == 0
    out = capsys.readouterr().out
    assert "search text of 40 calls indexed (40 were waiting); 1 rollup cells" in out
    with UnitOfWork(engine) as uow:
        assert search_index.pending(uow.session) == 0
        stale = uow.session.scalar(
            select(func.count()).where(CallRollup.latencies_count != CallRollup.latency_count)
        )
        assert stale == 0
    check_everything(engine)
    assert cli_main(["db", "catch-up"]) == 0  # nothing left: a no-op
    assert "search text of 0 calls indexed (0 were waiting); 0 rollup cells" in (
        capsys.readouterr().out
    )
