"""Aggregates answered from the hourly rollups, exactly, in a few vectorised steps.

`plan` splits a filter's time range into whole hours, answered by `call_rollup` cells,
and at most two partial hours at its ends, answered by the matching `raw_calls` rows
(found through the ``created_at`` index). Filters on providers, models, modality and
status select cells by their key; a group filter cannot be answered here (callers fall
back to `raw_calls`). Cells and edge rows become one table of numpy columns; output rows
(overall, per provider/model, per time bucket and provider or model) are formed by
grouping it: counts and sums add up, and each group's latencies (the sorted arrays of
its cells, plus edge latencies) are concatenated and partitioned to pick exactly the
order statistics the database's own percentile SQL picks, with the same floating-point
interpolation (see `study_query_llm.db.aggregates`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from study_query_llm.db import rollups
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import RawCall

_HOUR = timedelta(hours=1)
_DAY_S = 86_400
_EMPTY = np.empty(0, dtype="<f8")
_MEASURES = (
    "calls",
    "latency_count",
    "latency_sum",
    "prompt_tokens_count",
    "prompt_tokens_sum",
    "completion_tokens_count",
    "completion_tokens_sum",
    "total_tokens_count",
    "total_tokens_sum",
    "cost_sum",
)


@dataclass(frozen=True)
class Plan:
    """Whole hours [start, end) from cells (when `cells`), `edges` from `raw_calls`."""

    cells: bool
    start: datetime | None
    end: datetime | None
    edges: tuple[tuple[datetime | None, datetime | None], ...]


DERIVED_PER_SNAPSHOT = 16  # answers kept with each snapshot (a time series is ~1 MB)
_DERIVED_LOCK = threading.Lock()


def plan(filters: CallFilters) -> Plan | None:
    """How the rollups answer `filters`; None when they cannot (a group filter)."""
    if filters.group_id is not None:
        return None
    start, end = filters.start, filters.end
    if start is not None and end is not None and start >= end:
        return Plan(False, None, None, ())
    first = None if start is None else rollups.hour_of(start)
    if first is not None and start is not None and first != start:
        first += _HOUR  # the first whole hour
    last = None if end is None else rollups.hour_of(end)  # where the last whole hour ends
    if first is not None and last is not None and first >= last:
        return Plan(False, None, None, ((start, end),))
    edges = []
    if start is not None and first != start:
        edges.append((start, first))
    if end is not None and last != end:
        edges.append((last, end))
    return Plan(True, first, last, tuple(edges))


@dataclass
class Table:
    """The selected cells and edge calls as columns (one entry per cell or call)."""

    epoch: np.ndarray  # the hour's start, seconds since 1970 UTC
    provider: np.ndarray
    model: np.ndarray
    success: np.ndarray
    measures: dict[str, np.ndarray]
    latencies: list[np.ndarray]  # each entry's sorted latencies (views), when asked for

    def __len__(self) -> int:
        return len(self.epoch)


def _snapshot(session: Session, how: Plan) -> rollups.Snapshot | None:
    return rollups.MIRROR.snapshot(session, how.start, how.end) if how.cells else None


def _selected(
    session: Session, filters: CallFilters, how: Plan, snap: rollups.Snapshot | None = None
) -> tuple[Any, np.ndarray]:
    """The rollup snapshot and the positions of its cells that `filters` select."""
    if not how.cells:
        return None, np.empty(0, dtype="int64")
    snap = snap if snap is not None else _snapshot(session, how)
    assert snap is not None
    mask = np.ones(len(snap), dtype=bool)
    if how.start is not None:
        mask &= snap.epoch >= int(how.start.timestamp())
    if how.end is not None:
        mask &= snap.epoch < int(how.end.timestamp())
    for name, wanted in (("provider", filters.providers), ("model", filters.models)):
        if wanted:
            wanted_set = set(wanted)
            mask &= np.fromiter(
                (v in wanted_set for v in getattr(snap, name)), dtype=bool, count=len(snap)
            )
    for name, value in (("modality", filters.modality), ("status", filters.status)):
        if value is not None:
            mask &= getattr(snap, name) == value
    mask &= snap.measures["calls"] > 0
    return snap, np.nonzero(mask)[0]


def load(
    session: Session,
    filters: CallFilters,
    how: Plan,
    *,
    latencies: bool,
    snap: rollups.Snapshot | None = None,
) -> Table:
    """The cells and edge calls that answer `filters` (with their latencies if asked);
    `snap`: the snapshot to read them from, if the caller has it already."""
    snap, index = _selected(session, filters, how, snap)
    edges = _edges(session, filters, how)
    if snap is not None:
        epoch = [snap.epoch[index]]
        provider = [snap.provider[index]]
        model = [snap.model[index]]
        success = [snap.status[index] == "success"]
        measures = {name: [snap.measures[name][index]] for name in _MEASURES}
    else:
        epoch, provider, model, success = [], [], [], []
        measures = {name: [] for name in _MEASURES}
    arrays: list[np.ndarray] = []
    if latencies and snap is not None:
        values = snap.values
        arrays = [
            values[a : a + n]
            for a, n in zip(snap.starts[index].tolist(), snap.lengths[index].tolist(), strict=True)
        ]
    if edges:
        (created, providers, models, statuses, lat, pt, ct, tt, cost) = zip(*edges, strict=True)
        epoch.append(np.array([int(rollups.hour_of(c).timestamp()) for c in created]))
        provider.append(np.array(providers, dtype=object))
        model.append(np.array(models, dtype=object))
        success.append(np.array(statuses, dtype=object) == "success")
        columns: dict[str, list[Any]] = {
            "calls": [1] * len(edges),
            "cost_sum": [0.0 if v is None else v for v in cost],
        }
        for name, values_of, zero in (
            ("latency", lat, 0.0),
            ("prompt_tokens", pt, 0),
            ("completion_tokens", ct, 0),
            ("total_tokens", tt, 0),
        ):
            columns[f"{name}_count"] = [int(v is not None) for v in values_of]
            columns[f"{name}_sum"] = [zero if v is None else v for v in values_of]
        for name in _MEASURES:
            measures[name].append(np.asarray(columns[name], dtype=_dtype(name)))
        if latencies:
            arrays += [_EMPTY if v is None else np.array([v], dtype="<f8") for v in lat]

    def cat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    return Table(
        epoch=cat(epoch, "int64"),
        provider=cat(provider, "object"),
        model=cat(model, "object"),
        success=cat(success, "bool"),
        measures={name: cat(parts, _dtype(name)) for name, parts in measures.items()},
        latencies=arrays,
    )


def _dtype(measure: str) -> str:
    return "float64" if measure in ("latency_sum", "cost_sum") else "int64"


def _edges(session: Session, filters: CallFilters, how: Plan) -> list[Any]:
    """The calls of the partial hours that match `filters`. The database is asked only
    for the time range (the ``created_at`` index, whatever its statistics say); the
    other filters are applied here, to at most two hours of calls."""
    rows: list[Any] = []
    providers, models = set(filters.providers), set(filters.models)
    for start, end in how.edges:
        span = CallFilters(start=start, end=end)
        stmt = select(
            RawCall.created_at,
            RawCall.provider,
            RawCall.model,
            RawCall.status,
            RawCall.latency_ms,
            RawCall.prompt_tokens,
            RawCall.completion_tokens,
            RawCall.total_tokens,
            RawCall.cost_usd,
            RawCall.modality,
        ).where(*span.conditions())
        for row in session.connection().execute(stmt):
            if (
                (not providers or row.provider in providers)
                and (not models or row.model in models)
                and (filters.status is None or row.status == filters.status)
                and (filters.modality is None or row.modality == filters.modality)
            ):
                rows.append(row[:9])
    return rows


# --- grouping ---------------------------------------------------------------------------


def _bucket_epochs(epoch: np.ndarray, bucket: str) -> np.ndarray:
    """Hour starts truncated to `bucket` (UTC; weeks start on Monday, 1970-01-01 was a
    Thursday)."""
    if bucket == "hour":
        return epoch
    days = np.floor_divide(epoch, _DAY_S)
    if bucket == "day":
        return days * _DAY_S
    return (days - (days + 3) % 7) * _DAY_S


def collation_rank(session: Session, values: Sequence[str]) -> dict[str, int]:
    """Each string's place in the database's ORDER BY (its collation)."""
    strings = sorted(set(values))
    if strings and session.get_bind().dialect.name == "postgresql":
        rows = ", ".join(f"(:s{i})" for i in range(len(strings)))
        strings = list(
            session.scalars(
                text(f"SELECT column1 FROM (VALUES {rows}) AS v ORDER BY column1"),
                {f"s{i}": s for i, s in enumerate(strings)},
            )
        )
    # SQLite's default (BINARY) collation is code point order, Python's sort order.
    return {s: i for i, s in enumerate(strings)}


def stats_columns(
    session: Session,
    filters: CallFilters,
    names: tuple[str, ...],
    bucket: str,
    percentiles: Sequence[tuple[str, float]],
) -> dict[str, Any] | None:
    """CallStats fields as columns (one entry per group of `names`: bucket, provider,
    model), ordered by the groups as the database orders them; None when the rollups
    cannot answer `filters`. Missing means and percentiles are NaN.

    The answer is kept with the cached rollup snapshot it was computed from (its latest
    `DERIVED_PER_SNAPSHOT` answers): every session asking the same question of the same
    cells (the Analytics tab's default view, say) gets it without recomputing the
    percentiles over every latency. Calls are never changed or deleted, so cells with the
    same totals hold the same calls; a new call makes a new snapshot, which starts empty.
    Filters with partial hours also read raw_calls at the edges: those calls are counted in
    the totals too."""
    how = plan(filters)
    if how is None:
        return None
    snap = _snapshot(session, how)
    key = (filters, names, bucket, tuple(percentiles))
    if snap is not None and (known := _recall(snap, key)) is not None:
        return known
    columns = _stats_columns(session, filters, how, snap, names, bucket, percentiles)
    if snap is not None:
        _remember(snap, key, columns)
    return dict(columns)


def _recall(snap: rollups.Snapshot, key: Any) -> dict[str, Any] | None:
    """The columns computed for `key` from exactly `snap`'s cells, if kept (a new dict:
    callers may take entries out; the arrays are read-only)."""
    with _DERIVED_LOCK:
        found = snap.derived.get(key)
        if found is not None:
            snap.derived.move_to_end(key)
    return None if found is None else dict(found)


def _remember(snap: rollups.Snapshot, key: Any, columns: dict[str, Any]) -> None:
    for value in columns.values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    with _DERIVED_LOCK:
        snap.derived[key] = dict(columns)
        while len(snap.derived) > DERIVED_PER_SNAPSHOT:
            snap.derived.popitem(last=False)


def _stats_columns(
    session: Session,
    filters: CallFilters,
    how: Plan,
    snap: rollups.Snapshot | None,
    names: tuple[str, ...],
    bucket: str,
    percentiles: Sequence[tuple[str, float]],
) -> dict[str, Any]:
    table = load(session, filters, how, latencies=True, snap=snap)
    # One integer code per key column, then one group id per distinct combination.
    codes = []
    decoders: list[tuple[str, np.ndarray]] = []
    rank: dict[str, int] = {}
    for name in names:
        if name == "bucket":
            values, inverse = np.unique(_bucket_epochs(table.epoch, bucket), return_inverse=True)
            codes.append(inverse.reshape(-1))
            moments = [datetime.fromtimestamp(v, UTC) for v in values.tolist()]
            decoders.append((name, np.asarray(moments, dtype=object)))
        else:
            codes_of: dict[str, int] = {}
            column = getattr(table, name)
            inverse = np.fromiter(
                (codes_of.setdefault(v, len(codes_of)) for v in column),
                dtype="int64",
                count=len(column),
            )
            values = list(codes_of)
            if not rank:
                strings = set(table.provider.tolist()) | set(table.model.tolist())
                rank = collation_rank(session, list(strings))
            order = np.argsort([rank[v] for v in values], kind="stable")
            position = np.empty(len(order), dtype="int64")
            position[order] = np.arange(len(order))
            codes.append(position[inverse])  # codes in collation order
            decoders.append((name, np.asarray(values, dtype=object)[order]))
    if not names:
        unique = np.zeros((1 if len(table) else 0, 0), dtype="int64")
        group = np.zeros(len(table), dtype="int64")
    elif len(table):
        unique, group = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
        group = group.reshape(-1)  # unique rows come sorted: the output order
    else:
        unique = np.zeros((0, len(names)), dtype="int64")
        group = np.zeros(0, dtype="int64")
    n_groups = len(unique)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=values, minlength=n_groups)

    def whole(values: np.ndarray) -> np.ndarray:
        return total(values).round().astype("int64")  # exact below 2**53

    m = table.measures
    columns: dict[str, Any] = {"provider": None, "model": None, "bucket": None}
    for (name, values), code in zip(decoders, unique.T, strict=True):
        columns[name] = values[code]
    calls = whole(m["calls"])
    successes = whole(np.where(table.success, m["calls"], 0))
    failures = calls - successes
    with np.errstate(divide="ignore", invalid="ignore"):
        columns.update(
            count=calls,
            successes=successes,
            failures=failures,
            failure_rate=np.where(calls > 0, failures / np.maximum(calls, 1), np.nan),
        )
        for column in ("prompt_tokens", "completion_tokens", "total_tokens"):
            n = whole(m[f"{column}_count"])
            s = whole(m[f"{column}_sum"])
            columns[f"{column}_sum"] = s
            columns[f"{column}_mean"] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
        latency_n = whole(m["latency_count"])
        columns["latency_mean_ms"] = np.where(
            latency_n > 0, total(m["latency_sum"]) / np.maximum(latency_n, 1), np.nan
        )
    columns["cost_usd_sum"] = total(m["cost_sum"])
    quantiles = _group_percentiles(
        table, group, n_groups, [p for _, p in percentiles], _postgres(session)
    )
    for (name, _), values in zip(percentiles, quantiles, strict=True):
        columns[name] = values
    columns["groups"] = n_groups
    return columns


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _group_percentiles(
    table: Table, group: np.ndarray, n_groups: int, ps: Sequence[float], postgres: bool
) -> list[np.ndarray]:
    """Per p, per group: the p-quantile of the group's latencies exactly as the
    database's SQL computes it, NaN for a group without latencies.

    The latencies are laid out group after group; a group made of several sorted pieces
    is partitioned around the ranks needed. The ranks and the interpolation follow
    `aggregates._postgres_stmt` (``percentile_cont``) or `aggregates._sqlite_stmt` step
    by step, in the same float64 arithmetic.
    """
    arrays = table.latencies
    sizes = np.fromiter((len(a) for a in arrays), dtype="int64", count=len(arrays))
    order = np.argsort(group, kind="stable")
    parts = [arrays[i] for i in order.tolist() if sizes[i]]
    values = np.concatenate(parts) if parts else _EMPTY.copy()
    n = np.bincount(group, weights=sizes, minlength=n_groups).round().astype("int64")
    pieces = np.bincount(group, weights=(sizes > 0), minlength=n_groups).round().astype("int64")
    offsets = np.zeros(n_groups + 1, dtype="int64")
    np.cumsum(n, out=offsets[1:])
    plans = []  # (lower index, upper index, fraction; fraction NaN: the lower value itself)
    nm1 = np.maximum(n - 1, 0).astype("float64")
    for p in ps:
        if postgres:  # percentile_cont: between floor(h) and ceil(h), h = p * (n - 1)
            h = p * nm1
            first = np.floor(h).astype("int64")
            second = np.ceil(h).astype("int64")
            plans.append((first, second, np.where(first == second, np.nan, h - first)))
        else:  # 1-based rank h = 1 + (n - 1) * p, between int(h) and int(h) + 1
            h = 1 + nm1 * p
            rank = h.astype("int64")
            plans.append((rank - 1, np.minimum(rank, np.maximum(n - 1, 0)), h - rank))
    if len(values):
        kth = np.stack([k for i, j, _ in plans for k in (i, j)], axis=1)
        for g in np.nonzero((pieces > 1) & (n > 0))[0].tolist():
            a = offsets[g]
            values[a : offsets[g + 1]].partition(np.unique(kth[g]))
    has = n > 0
    base = offsets[:-1]
    result = []
    for i, j, fraction in plans:
        lo = np.full(n_groups, np.nan)
        hi = np.full(n_groups, np.nan)
        lo[has] = values[base[has] + i[has]]
        hi[has] = values[base[has] + j[has]]
        value = np.where(np.isnan(fraction), lo, lo + fraction * (hi - lo))
        result.append(np.where(has, value, np.nan))
    return result


# --- counts -----------------------------------------------------------------------------


def count(session: Session, filters: CallFilters) -> int | None:
    """How many calls match `filters`; None when the rollups cannot answer."""
    how = plan(filters)
    if how is None:
        return None
    table = load(session, filters, how, latencies=False)
    return int(table.measures["calls"].sum())


def keys(session: Session, filters: CallFilters) -> set[tuple[str, str]] | None:
    """The distinct (provider, model) of the matching calls; None when the rollups cannot
    answer."""
    how = plan(filters)
    if how is None:
        return None
    table = load(session, filters, how, latencies=False)
    return set(zip(table.provider.tolist(), table.model.tolist(), strict=True))
