"""Aggregates over `raw_calls`, computed by the database over every matching row.

Counts, success/failure counts and rate, token sums and means, latency mean and
percentiles, cost sums — overall, per (provider, model), or per time bucket.

Where the hourly rollups (`study_query_llm.db.rollups`) can answer exactly, they do: the
filters may name providers, models, modality, status and any time range (whole hours
come from the rollups, the rest of a partial first or last hour from `raw_calls`);
buckets of an hour or longer. A group filter or minute buckets read `raw_calls`.
Percentiles from the rollups pick exactly the same order statistics and interpolate
with the same arithmetic as each database's own SQL below, so both ways give the same
numbers; sums of floating-point values (latency mean, cost) can differ only in the last
digits, from adding in another order. Pass ``use_rollups=False`` to read `raw_calls`.

Percentiles follow one definition everywhere: linear interpolation between the two
nearest ranks, as PostgreSQL's ``percentile_cont`` and pandas'
``quantile(interpolation="linear")``. PostgreSQL computes them with ``percentile_cont``;
SQLite has no such function, so there each row gets its rank among the non-null
latencies of its group (``ROW_NUMBER``/``COUNT`` windows) and the value is interpolated
between the rows at ranks ``floor(h)`` and ``floor(h) + 1``, ``h = 1 + (n - 1) * p``.

A call "fails" when its status is anything but ``success`` (failed, timeout, cancelled).
Means and percentiles ignore NULLs and are None when there is nothing to average;
sums of nothing are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    case,
    cast,
    func,
    literal,
    literal_column,
    select,
    type_coerce,
)
from sqlalchemy.orm import Session

from study_query_llm.db import rollup_read
from study_query_llm.db.column_types import UTCDateTime
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import RawCall

if TYPE_CHECKING:
    import pandas as pd

Bucket = Literal["minute", "hour", "day", "week"]
GroupBy = Literal["provider", "model"] | None

BUCKETS: tuple[str, ...] = ("minute", "hour", "day", "week")
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("latency_p50_ms", 0.5),
    ("latency_p90_ms", 0.9),
    ("latency_p99_ms", 0.99),
)
_TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")

# SQLite strftime() formats (and date modifiers) that truncate a timestamp to a bucket.
# "week" starts on Monday, like PostgreSQL's date_trunc('week', ...).
_SQLITE_BUCKETS: dict[str, tuple[str, ...]] = {
    "minute": ("%Y-%m-%d %H:%M:00",),
    "hour": ("%Y-%m-%d %H:00:00",),
    "day": ("%Y-%m-%d 00:00:00",),
    "week": ("%Y-%m-%d 00:00:00", "-6 days", "weekday 1"),
}


@dataclass(frozen=True)
class CallStats:
    """Aggregates of one group of calls; the key fields not grouped on are None."""

    provider: str | None
    model: str | None
    bucket: datetime | None
    count: int
    successes: int
    failures: int
    failure_rate: float | None
    prompt_tokens_sum: int
    prompt_tokens_mean: float | None
    completion_tokens_sum: int
    completion_tokens_mean: float | None
    total_tokens_sum: int
    total_tokens_mean: float | None
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    cost_usd_sum: float

    def as_dict(self) -> dict[str, Any]:
        """The stats as a plain dict (one row of a frame)."""
        return {name: getattr(self, name) for name in _STATS_FIELDS}


_STATS_FIELDS = tuple(f.name for f in fields(CallStats))
_OPTIONAL_FLOATS = (
    "failure_rate",
    "prompt_tokens_mean",
    "completion_tokens_mean",
    "total_tokens_mean",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
)


def summary(session: Session, filters: CallFilters, *, use_rollups: bool = True) -> CallStats:
    """Aggregates over every call that matches `filters`."""
    if use_rollups and (stats := _rollup_stats(session, filters, ())) is not None:
        return stats[0] if stats else _empty_stats()
    return _stats(session, filters, {})[0]


def by_provider_model(
    session: Session, filters: CallFilters, *, use_rollups: bool = True
) -> list[CallStats]:
    """Aggregates per (provider, model), ordered by provider then model."""
    if (
        use_rollups
        and (stats := _rollup_stats(session, filters, ("provider", "model"))) is not None
    ):
        return stats
    return _stats(session, filters, {"provider": RawCall.provider, "model": RawCall.model})


def time_buckets(
    session: Session,
    filters: CallFilters,
    bucket: Bucket = "hour",
    by: GroupBy = None,
    *,
    use_rollups: bool = True,
) -> list[CallStats]:
    """Aggregates per UTC time bucket (and per provider or model), oldest bucket first.

    Only buckets that contain calls are returned.
    """
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {BUCKETS}, got {bucket!r}")
    if by not in ("provider", "model", None):
        raise ValueError(f"by must be 'provider', 'model' or None, got {by!r}")
    if use_rollups and bucket != "minute":
        names = ("bucket", by) if by is not None else ("bucket",)
        stats = _rollup_stats(session, filters, names, bucket)
        if stats is not None:
            return stats
    keys: dict[str, ColumnElement[Any]] = {"bucket": _bucket_expr(session, bucket)}
    if by is not None:
        keys[by] = getattr(RawCall, by)
    return _stats(session, filters, keys)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _bucket_expr(session: Session, bucket: str) -> ColumnElement[datetime]:
    # `bucket` is one of BUCKETS, so rendering it inline is safe; inline (not bound)
    # keeps the SELECT and GROUP BY expressions identical, as PostgreSQL requires.
    if _dialect(session) == "postgresql":
        expr = func.date_trunc(
            literal_column(f"'{bucket}'"),
            func.timezone(literal_column("'UTC'"), RawCall.created_at),
        )
    else:
        args = [literal_column(f"'{arg}'") for arg in _SQLITE_BUCKETS[bucket]]
        # Cut the stored text ("YYYY-MM-DD HH:MM:SS.ffffff") to whole seconds first:
        # SQLite's date functions round to milliseconds, which would move 23:59:59.9999
        # into the next day (and the next bucket).
        whole_seconds = func.substr(RawCall.created_at, 1, 19)
        expr = func.strftime(args[0], whole_seconds, *args[1:])
    return type_coerce(expr, UTCDateTime())


def _measures(c: Any) -> list[ColumnElement[Any]]:
    """Aggregate columns over `c` (the mapped class or a subquery's columns)."""
    count = func.count()
    failures = func.sum(case((c.status == "success", 0), else_=1))
    columns: list[ColumnElement[Any]] = [
        count.label("count"),
        func.coalesce(func.sum(case((c.status == "success", 1), else_=0)), 0).label("successes"),
        func.coalesce(failures, 0).label("failures"),
        (cast(failures, Float) / func.nullif(count, 0)).label("failure_rate"),
    ]
    for name in _TOKEN_COLUMNS:
        column = getattr(c, name)
        columns.append(func.coalesce(func.sum(column), 0).label(f"{name}_sum"))
        columns.append(cast(func.avg(column), Float).label(f"{name}_mean"))
    columns.append(cast(func.avg(c.latency_ms), Float).label("latency_mean_ms"))
    columns.append(func.coalesce(func.sum(c.cost_usd), 0.0).label("cost_usd_sum"))
    return columns


def _postgres_stmt(filters: CallFilters, keys: dict[str, ColumnElement[Any]]) -> Select[Any]:
    percentiles = [
        func.percentile_cont(literal(p, Float)).within_group(RawCall.latency_ms).label(name)
        for name, p in PERCENTILES
    ]
    key_exprs = list(keys.values())
    return (
        select(
            *(expr.label(name) for name, expr in keys.items()),
            *_measures(RawCall),
            *percentiles,
        )
        .where(*filters.conditions())
        .group_by(*key_exprs)
        .order_by(*key_exprs)
    )


def _sqlite_stmt(filters: CallFilters, keys: dict[str, ColumnElement[Any]]) -> Select[Any]:
    partition = list(keys.values()) or None
    ranked = (
        select(
            *(expr.label(name) for name, expr in keys.items()),
            RawCall.status,
            RawCall.latency_ms,
            RawCall.cost_usd,
            *(getattr(RawCall, name) for name in _TOKEN_COLUMNS),
            func.row_number()
            .over(partition_by=partition, order_by=RawCall.latency_ms.asc().nulls_last())
            .label("rank"),
            func.count(RawCall.latency_ms).over(partition_by=partition).label("n_latency"),
        )
        .where(*filters.conditions())
        .subquery("ranked")
    )
    r = ranked.c
    percentiles = []
    for name, p in PERCENTILES:
        h = 1 + (r.n_latency - 1) * literal(p, Float)  # 1-based fractional rank
        lower_rank = cast(h, Integer)  # floor: h >= 1 whenever there is a latency
        fraction = func.max(h - lower_rank)  # the same on every row of a group
        lower = func.max(case((r.rank == lower_rank, r.latency_ms)))
        upper = func.coalesce(func.max(case((r.rank == lower_rank + 1, r.latency_ms))), lower)
        percentiles.append((lower + fraction * (upper - lower)).label(name))
    key_columns = [r[name] for name in keys]
    return (
        select(*key_columns, *_measures(r), *percentiles)
        .group_by(*key_columns)
        .order_by(*key_columns)
    )


def _stats(
    session: Session, filters: CallFilters, keys: dict[str, ColumnElement[Any]]
) -> list[CallStats]:
    if _dialect(session) == "postgresql":
        stmt = _postgres_stmt(filters, keys)
    else:
        stmt = _sqlite_stmt(filters, keys)
    return [_to_stats(row) for row in session.execute(stmt).mappings()]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _to_stats(row: Any) -> CallStats:
    return CallStats(
        provider=row.get("provider"),
        model=row.get("model"),
        bucket=row.get("bucket"),
        count=int(row["count"]),
        successes=int(row["successes"]),
        failures=int(row["failures"]),
        failure_rate=_float(row["failure_rate"]),
        prompt_tokens_sum=int(row["prompt_tokens_sum"]),
        prompt_tokens_mean=_float(row["prompt_tokens_mean"]),
        completion_tokens_sum=int(row["completion_tokens_sum"]),
        completion_tokens_mean=_float(row["completion_tokens_mean"]),
        total_tokens_sum=int(row["total_tokens_sum"]),
        total_tokens_mean=_float(row["total_tokens_mean"]),
        latency_mean_ms=_float(row["latency_mean_ms"]),
        latency_p50_ms=_float(row["latency_p50_ms"]),
        latency_p90_ms=_float(row["latency_p90_ms"]),
        latency_p99_ms=_float(row["latency_p99_ms"]),
        cost_usd_sum=float(row["cost_usd_sum"]),
    )


def _rollup_stats(
    session: Session,
    filters: CallFilters,
    names: tuple[str, ...],
    bucket: str = "hour",
) -> list[CallStats] | None:
    """`_stats` answered from the rollups, in the same order (None: they cannot answer)."""
    columns = rollup_read.stats_columns(session, filters, names, bucket, PERCENTILES)
    if columns is None:
        return None
    n = columns.pop("groups")
    values = {}
    for name in _STATS_FIELDS:
        column = columns[name]
        if column is None:
            values[name] = [None] * n
        elif name in _OPTIONAL_FLOATS:
            values[name] = [None if v != v else v for v in column.tolist()]  # NaN: None
        else:
            values[name] = column.tolist() if hasattr(column, "tolist") else list(column)
    return [CallStats(*row) for row in zip(*(values[f] for f in _STATS_FIELDS), strict=True)]


def stats_frame(
    session: Session,
    filters: CallFilters,
    by: tuple[str, ...],
    bucket: Bucket = "hour",
    *,
    use_rollups: bool = True,
) -> pd.DataFrame:
    """The aggregates grouped by `by` (of "bucket", "provider", "model") as a frame with
    one column per `CallStats` field (missing means and percentiles are NaN): what
    `summary`, `by_provider_model` and `time_buckets` return, without building an
    object per row."""
    import pandas as pd  # only here: the library imports without pandas

    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {BUCKETS}, got {bucket!r}")
    columns = None
    if use_rollups and not ("bucket" in by and bucket == "minute"):
        columns = rollup_read.stats_columns(session, filters, by, bucket, PERCENTILES)
    if columns is None:
        keys: dict[str, ColumnElement[Any]] = {}
        for name in by:
            keys[name] = (
                _bucket_expr(session, bucket) if name == "bucket" else getattr(RawCall, name)
            )
        rows = [s.as_dict() for s in _stats(session, filters, keys)]
        frame = pd.DataFrame(rows, columns=list(_STATS_FIELDS))
    else:
        columns.pop("groups")
        frame = pd.DataFrame({name: columns[name] for name in _STATS_FIELDS})
    for name in _OPTIONAL_FLOATS:
        frame[name] = frame[name].astype("float64")
    return frame


def _empty_stats() -> CallStats:
    return CallStats(
        None, None, None, 0, 0, 0, None, 0, None, 0, None, 0, None, None, None, None, None, 0.0
    )
