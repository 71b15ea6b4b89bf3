"""Aggregates computed by the database match pandas over the same rows, on both databases."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from study_query_llm.db.aggregates import CallStats
from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import STATUSES
from study_query_llm.db.records import NewCall

T0 = datetime(2024, 1, 6, 23, 58, 30, tzinfo=UTC)  # a Saturday, just before midnight

NUMERIC = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_ms",
    "cost_usd",
]


def _record(engine: Engine, calls: Sequence[NewCall]) -> int:
    """Record the calls in a new group of their own; returns the group id."""
    with UnitOfWork(engine) as uow:
        ids = uow.calls.add_many(calls)
        group = uow.groups.create("test", f"agg-{uuid.uuid4()}")
        uow.groups.add_members(group.id, ids)
        uow.commit()
        return group.id


def _frame(calls: Sequence[NewCall]) -> pd.DataFrame:
    frame = pd.DataFrame([c.row() for c in calls], columns=[*NUMERIC, "provider", "model"])
    frame["status"] = [c.status for c in calls]
    frame["created_at"] = pd.to_datetime([c.row()["created_at"] for c in calls], utc=True)
    for name in NUMERIC:
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return frame


def _expected(frame: pd.DataFrame) -> dict[str, Any]:
    """What CallStats should say about these rows, computed by pandas."""
    success = frame["status"] == "success"
    expected: dict[str, Any] = {
        "count": len(frame),
        "successes": int(success.sum()),
        "failures": int((~success).sum()),
        "failure_rate": float((~success).mean()) if len(frame) else None,
        "latency_mean_ms": frame["latency_ms"].mean(),
        "cost_usd_sum": float(frame["cost_usd"].sum()),
    }
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        expected[f"{name}_sum"] = int(frame[name].sum())
        expected[f"{name}_mean"] = frame[name].mean()
    latencies = frame["latency_ms"].dropna()
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        value = latencies.quantile(q, interpolation="linear") if len(latencies) else None
        expected[f"latency_{label}_ms"] = value
    return expected


def _assert_stats(stats: CallStats, expected: dict[str, Any]) -> None:
    for name, want in expected.items():
        got = getattr(stats, name)
        if want is None or (isinstance(want, float) and math.isnan(want)):
            assert got is None, name
        elif isinstance(want, int):
            assert got == want, name
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9), name


def _check_all(engine: Engine, calls: Sequence[NewCall]) -> None:
    filters = CallFilters(group_id=_record(engine, calls))
    frame = _frame(calls)
    with UnitOfWork(engine) as uow:
        summary = uow.calls.summary(filters)
        per_model = uow.calls.by_provider_model(filters)
    _assert_stats(summary, _expected(frame))
    keys = sorted({(c.provider, c.model) for c in calls})
    assert [(s.provider, s.model) for s in per_model] == keys
    for stats in per_model:
        rows = frame[(frame["provider"] == stats.provider) & (frame["model"] == stats.model)]
        _assert_stats(stats, _expected(rows))


def test_aggregates_of_a_known_set(engine: Engine, make_call: Callable[..., NewCall]) -> None:
    latencies = [100.0, 200.0, 300.0, 400.0, 1000.0, None]
    calls = [
        make_call(
            provider="openai",
            model="gpt",
            latency_ms=latency,
            status="success" if i < 4 else "timeout",
            prompt_tokens=10 * i,
            completion_tokens=None if i == 0 else i,
            total_tokens=None,
            cost_usd=0.25,
        )
        for i, latency in enumerate(latencies)
    ] + [make_call(provider="anthropic", model="claude", latency_ms=50.0, cost_usd=None)]
    filters = CallFilters(group_id=_record(engine, calls))
    with UnitOfWork(engine) as uow:
        openai = uow.calls.by_provider_model(filters)[1]
        summary = uow.calls.summary(filters)
    assert (openai.provider, openai.count, openai.successes, openai.failures) == (
        "openai",
        6,
        4,
        2,
    )
    assert openai.failure_rate == pytest.approx(2 / 6)
    assert openai.prompt_tokens_sum == 150 and openai.prompt_tokens_mean == 25.0
    assert openai.completion_tokens_sum == 15 and openai.completion_tokens_mean == 3.0
    assert openai.total_tokens_sum == 0 and openai.total_tokens_mean is None
    assert openai.latency_mean_ms == 400.0
    # ranks of 5 values: p50 -> 3rd; p90 -> 4.6th; p99 -> 4.96th
    assert openai.latency_p50_ms == pytest.approx(300.0)
    assert openai.latency_p90_ms == pytest.approx(400.0 + 0.6 * 600.0)
    assert openai.latency_p99_ms == pytest.approx(400.0 + 0.96 * 600.0)
    assert openai.cost_usd_sum == pytest.approx(1.5)
    assert summary.count == 7 and summary.cost_usd_sum == pytest.approx(1.5)
    _check_all(engine, calls)


def test_aggregates_of_nothing(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        summary = uow.calls.summary(CallFilters(providers=("nobody",)))
        assert uow.calls.by_provider_model(CallFilters()) == []
        assert uow.calls.time_buckets(CallFilters(), "day") == []
    assert (summary.count, summary.successes, summary.failures) == (0, 0, 0)
    assert (summary.total_tokens_sum, summary.cost_usd_sum) == (0, 0.0)
    assert summary.failure_rate is None
    assert summary.latency_mean_ms is None and summary.latency_p99_ms is None


_maybe_int = st.none() | st.integers(min_value=0, max_value=1_000_000)
_maybe_float = st.none() | st.floats(
    min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False
)
_calls = st.lists(
    st.builds(
        NewCall,
        provider=st.sampled_from(["openai", "anthropic"]),
        model=st.sampled_from(["a", "b", "c"]),
        request_json=st.just({"prompt": "p"}),
        status=st.sampled_from(STATUSES),
        latency_ms=_maybe_float,
        prompt_tokens=_maybe_int,
        completion_tokens=_maybe_int,
        total_tokens=_maybe_int,
        cost_usd=_maybe_float,
    ),
    max_size=40,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=_calls)
def test_aggregates_match_pandas(engine: Engine, calls: list[NewCall]) -> None:
    _check_all(engine, calls)


def _week_start(ts: pd.Series) -> pd.Series:
    return (ts - pd.to_timedelta(ts.dt.day_of_week, unit="D")).dt.floor("D")


BUCKET_FLOORS: dict[str, Callable[[pd.Series], pd.Series]] = {
    "minute": lambda ts: ts.dt.floor("min"),
    "hour": lambda ts: ts.dt.floor("h"),
    "day": lambda ts: ts.dt.floor("D"),
    "week": _week_start,
}


@pytest.mark.parametrize("bucket", list(BUCKET_FLOORS))
@pytest.mark.parametrize("by", [None, "provider", "model"])
def test_time_buckets_match_pandas(
    engine: Engine, make_call: Callable[..., NewCall], bucket: str, by: str | None
) -> None:
    offsets = [0, 29, 29.999_999, 31, 90, 3600, 86_400, 2 * 86_400, 8 * 86_400, 8 * 86_400 + 1]
    calls = [
        make_call(
            provider=["openai", "anthropic"][i % 2],
            model=["a", "b", "c"][i % 3],
            latency_ms=float(10 * i + 1),
            status="success" if i % 4 else "failed",
            # the stored value is UTC whatever the zone it came in
            created_at=(T0 + timedelta(seconds=s)).astimezone(timezone(timedelta(hours=9))),
        )
        for i, s in enumerate(offsets)
    ]
    filters = CallFilters(group_id=_record(engine, calls))
    with UnitOfWork(engine) as uow:
        buckets = uow.calls.time_buckets(filters, bucket, by)

    frame = _frame(calls)
    frame["bucket"] = BUCKET_FLOORS[bucket](frame["created_at"])
    keys = ["bucket"] if by is None else ["bucket", by]
    expected = list(frame.groupby(keys, sort=True))  # keys are tuples: (bucket[, by])
    assert [(s.bucket, getattr(s, by) if by else None) for s in buckets] == [
        (key[0].to_pydatetime(), key[1] if by else None) for key, _ in expected
    ]
    for stats, (_, rows) in zip(buckets, expected, strict=True):
        assert stats.bucket.tzinfo is not None and stats.bucket.utcoffset() == timedelta(0)
        _assert_stats(stats, _expected(rows))


def test_week_buckets_start_on_monday(engine: Engine, make_call: Callable[..., NewCall]) -> None:
    sunday = datetime(2024, 1, 7, 23, 59, 59, 999999, tzinfo=UTC)
    monday = datetime(2024, 1, 8, tzinfo=UTC)
    filters = CallFilters(
        group_id=_record(engine, [make_call(created_at=sunday), make_call(created_at=monday)])
    )
    with UnitOfWork(engine) as uow:
        weeks = [s.bucket for s in uow.calls.time_buckets(filters, "week")]
    assert weeks == [datetime(2024, 1, 1, tzinfo=UTC), monday]


def test_time_buckets_reject_unknown_bucket_and_grouping(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        with pytest.raises(ValueError, match="bucket"):
            uow.calls.time_buckets(CallFilters(), "month")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="by must be"):
            uow.calls.time_buckets(CallFilters(), "day", "status")  # type: ignore[arg-type]
