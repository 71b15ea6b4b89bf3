"""Hourly rollups of `raw_calls` (`call_rollup`): kept exact on insert, read by the aggregates.

A cell is one UTC hour and one (provider, model, modality, status). It holds counts and
sums (calls; non-null counts and sums of latency and of each token column; cost) and the
cell's latencies, sorted, as little-endian float64 bytes. Any set of whole cells
answers counts, sums, means and *exact* percentiles: the latencies of the cells are
merged and the order statistics picked exactly as the base-table SQL does (see
`percentile`).

Keeping them in step, in the inserting transaction:
- PostgreSQL: a statement-level INSERT trigger upserts the counts and sums of every
  INSERT or COPY (migration 0005).
- SQLite: a row-level INSERT trigger does the same for INSERTs that do not come through
  the repository; the repository's bulk path (`RawCallRepository.add_many`) marks its
  ids in `bulk_insert_ranges`, which the trigger skips, and upserts the whole batch with
  one statement (`add_range`).
- The sorted latencies are merged in by the bulk path (`merge_latencies`). A cell whose
  latencies are behind its counts (rows that came in some other way) is detected by
  `latencies_count != latency_count` and read from `raw_calls` instead, so answers stay
  exact whichever way rows arrived; `repair` rewrites such cells.

Rows of `raw_calls` are never updated or deleted, so a cell with the same count (and
sum) as before holds exactly the same latencies: readers cache cells by
(database, cell id, count, sum) in a bounded, read-only, per-process cache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Engine, bindparam, select, text, tuple_
from sqlalchemy.orm import Session

from study_query_llm import memory
from study_query_llm.db.column_types import as_utc
from study_query_llm.db.models_v2 import CallRollup, RawCall, RollupState

KEYS = ("bucket", "provider", "model", "modality", "status")
MEASURES = (
    ("calls", "count(*)"),
    ("latency_count", "count(latency_ms)"),
    ("latency_sum", "coalesce(sum(latency_ms), 0.0)"),
    ("prompt_tokens_count", "count(prompt_tokens)"),
    ("prompt_tokens_sum", "coalesce(sum(prompt_tokens), 0)"),
    ("completion_tokens_count", "count(completion_tokens)"),
    ("completion_tokens_sum", "coalesce(sum(completion_tokens), 0)"),
    ("total_tokens_count", "count(total_tokens)"),
    ("total_tokens_sum", "coalesce(sum(total_tokens), 0)"),
    ("cost_sum", "coalesce(sum(cost_usd), 0.0)"),
)
SQLITE_BUCKET = "substr(created_at, 1, 13) || ':00:00.000000'"
CACHE_BYTES = 96 * 2**20  # cached latencies per process (5M calls are 40 MB)
TRIM_AFTER = 1_000_000  # latencies read in one refresh, from which freed memory is returned
_HOUR = timedelta(hours=1)
log = logging.getLogger(__name__)

_EMPTY = np.empty(0, dtype="<f8")


def hour_of(moment: datetime) -> datetime:
    """The UTC hour `moment` falls in (the `bucket` of its cell)."""
    return as_utc(moment).replace(minute=0, second=0, microsecond=0)


def pack(values: np.ndarray) -> bytes:
    """Sorted latencies as stored: little-endian float64 bytes."""
    return np.ascontiguousarray(values, dtype="<f8").tobytes()


def unpack(blob: bytes | None) -> np.ndarray:
    """Stored latencies back as a (read-only) float64 array."""
    if not blob:
        return _EMPTY
    return np.frombuffer(blob, dtype="<f8")


# --- writing ------------------------------------------------------------------------------


def _add_range_sql() -> Any:
    columns = ", ".join([*KEYS, *(name for name, _ in MEASURES)])
    aggregates = ", ".join(expr for _, expr in MEASURES)
    updates = ", ".join(f"{name} = cell.{name} + excluded.{name}" for name, _ in MEASURES)
    return text(
        f"INSERT INTO call_rollup AS cell ({columns}) "
        f"SELECT {SQLITE_BUCKET}, provider, model, modality, status, {aggregates} "
        "FROM raw_calls WHERE id BETWEEN :first AND :last "
        "GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 "
        f"ON CONFLICT ({', '.join(KEYS)}) DO UPDATE SET {updates}"
    )


_ADD_RANGE = _add_range_sql()
_CELLS = CallRollup.__table__
_CELL_COLUMNS = (
    _CELLS.c.id,
    _CELLS.c.bucket,
    _CELLS.c.provider,
    _CELLS.c.model,
    _CELLS.c.modality,
    _CELLS.c.status,
    _CELLS.c.latency_count,
    _CELLS.c.latencies_count,
    _CELLS.c.latencies,
)
# The cells a batch touched, with their stored latencies, in id order (updates go in id
# order: no deadlocks between writers). A few cells (the recorder's batches): exactly
# those, by key. Many (bulk loads): every cell of their hours, filtered here, which
# keeps the statement small where a long list of keys would cost more to plan than run.
_CELLS_BY_KEY = (
    select(*_CELL_COLUMNS)
    .where(tuple_(*(_CELLS.c[key] for key in KEYS)).in_(bindparam("cells", expanding=True)))
    .order_by(_CELLS.c.id)
)
_CELLS_OF_HOURS = (
    select(*_CELL_COLUMNS)
    .where(_CELLS.c.bucket.in_(bindparam("hours", expanding=True)))
    .order_by(_CELLS.c.id)
)
KEYED_CELLS = 20  # up to this many touched cells are read by key
_SET_LATENCIES = text(
    "UPDATE call_rollup SET latencies = :blob, latencies_count = :n WHERE id = :cell"
)


def add_range(session: Session, first_id: int, last_id: int) -> None:
    """Add the counts and sums of the calls with ids in [first_id, last_id] (SQLite's bulk
    path; on PostgreSQL the insert trigger does this)."""
    session.connection().execute(_ADD_RANGE, {"first": first_id, "last": last_id})


def _cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (hour_of(row["created_at"]), row["provider"], row["model"], row["modality"])


def merge_latencies(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    """Merge the latencies of just-inserted `rows` into their cells' sorted latencies.

    Call after the rows are in (and their counts rolled up). A cell whose stored
    latencies were already behind is rebuilt from `raw_calls` instead.
    """
    added: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for row in rows:
        latency = row.get("latency_ms")
        if latency is not None:
            added[(*_cell_key(row), row["status"])].append(float(latency))
    if not added:
        return
    connection = session.connection()  # plain statements: this runs with every write
    if len(added) <= KEYED_CELLS:
        reads = [(_CELLS_BY_KEY, {"cells": list(added)})]
    else:
        hours = sorted({key[0] for key in added})
        reads = [
            (_CELLS_OF_HOURS, {"hours": hours[first : first + 500]})
            for first in range(0, len(hours), 500)
        ]
    updates = []
    for statement, params in reads:
        for cell in connection.execute(statement, params):
            cell_key = (as_utc(cell.bucket), *cell[2:6])
            if cell_key not in added:
                continue  # another cell of the same hour
            new = np.sort(np.asarray(added[cell_key], dtype="<f8"), kind="stable")
            if cell.latencies_count == cell.latency_count - len(new):
                merged = np.sort(np.concatenate([unpack(cell.latencies), new]), kind="stable")
            else:  # behind (rows inserted some other way): read the whole cell
                merged = _cell_latencies(session, *cell_key)
            updates.append({"cell": cell.id, "blob": pack(merged), "n": len(merged)})
    if updates:
        updates.sort(key=lambda update: update["cell"])  # id order across the chunks too
        connection.execute(_SET_LATENCIES, updates)


def _cell_latencies(
    session: Session, bucket: datetime, provider: str, model: str, modality: str, status: str
) -> np.ndarray:
    """A cell's latencies, sorted, read from `raw_calls`."""
    start = hour_of(bucket)
    values = session.scalars(
        select(RawCall.latency_ms).where(
            RawCall.provider == provider,
            RawCall.model == model,
            RawCall.created_at >= start,
            RawCall.created_at < start + _HOUR,
            RawCall.modality == modality,
            RawCall.status == status,
            RawCall.latency_ms.is_not(None),
        )
    ).all()
    return np.sort(np.asarray(values, dtype="<f8"), kind="stable")


def repair(engine: Engine) -> int:
    """Rewrite the stored latencies of every cell that is behind its counts; returns how
    many cells were rewritten (0 when everything arrived through the bulk path)."""
    from study_query_llm.db.connection import UnitOfWork

    repaired = 0
    with UnitOfWork(engine, write=True) as uow:
        stale = uow.session.execute(
            select(*(getattr(CallRollup, k) for k in ("id", *KEYS))).where(
                CallRollup.latencies_count != CallRollup.latency_count
            )
        ).all()
        for cell in stale:
            values = _cell_latencies(uow.session, *cell[1:])
            uow.session.execute(
                text(
                    "UPDATE call_rollup SET latencies = :blob, latencies_count = :n WHERE id = :id"
                ),
                {"blob": pack(values), "n": len(values), "id": cell.id},
            )
            repaired += 1
        uow.commit()
    return repaired


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Rollup cells of one database as read-only columns, ordered by hour.

    Cell i covers hour `epoch[i]` (seconds since 1970, UTC); its sorted latencies are
    ``values[starts[i] : starts[i] + lengths[i]]``. `versions` maps each hour to the
    (calls, latencies, cells) totals its cells were read at.
    """

    versions: dict[int, tuple[int, int, int]]
    epoch: np.ndarray
    provider: np.ndarray
    model: np.ndarray
    modality: np.ndarray
    status: np.ndarray
    measures: dict[str, np.ndarray]
    starts: np.ndarray
    lengths: np.ndarray
    values: np.ndarray
    # Answers computed from exactly these cells (`rollup_read.stats_columns`), kept with
    # them: a newer snapshot starts empty, so nothing outlives the cells it came from.
    derived: OrderedDict[Any, Any] = field(
        default_factory=OrderedDict, init=False, compare=False, repr=False
    )

    def __len__(self) -> int:
        return len(self.epoch)

    def hour_slices(self) -> dict[int, tuple[int, int]]:
        """Each hour's [first, last) cell positions."""
        if not len(self):
            return {}
        hours, first = np.unique(self.epoch, return_index=True)
        last = np.append(first[1:], len(self))
        return {int(h): (int(a), int(b)) for h, a, b in zip(hours, first, last, strict=True)}

    def take(self, index: np.ndarray) -> Snapshot:
        """The cells at `index` (positions, in order), with their latencies copied out."""
        lengths = self.lengths[index]
        starts = np.zeros(len(index), dtype="int64")
        if len(index):
            np.cumsum(lengths[:-1], out=starts[1:])
        return Snapshot(
            versions={},
            epoch=self.epoch[index],
            provider=self.provider[index],
            model=self.model[index],
            modality=self.modality[index],
            status=self.status[index],
            measures={k: v[index] for k, v in self.measures.items()},
            starts=starts,
            lengths=lengths,
            values=self.values[_ranges(self.starts[index], lengths)],
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] ... starts[i] + lengths[i] - 1`` of every i, in order."""
    total = int(lengths.sum())
    if not total:
        return np.empty(0, dtype="int64")
    ends = np.cumsum(lengths)
    offsets = np.repeat(starts - (ends - lengths), lengths)
    return offsets + np.arange(total, dtype="int64")


def _concat(parts: Sequence[Snapshot], versions: dict[int, tuple[int, int, int]]) -> Snapshot:
    lengths = np.concatenate([p.lengths for p in parts]) if parts else np.empty(0, "int64")
    starts = np.zeros(len(lengths), dtype="int64")
    if len(lengths):
        np.cumsum(lengths[:-1], out=starts[1:])

    def cat(name: str, dtype: str) -> np.ndarray:
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)

    return Snapshot(
        versions=versions,
        epoch=cat("epoch", "int64"),
        provider=cat("provider", "object"),
        model=cat("model", "object"),
        modality=cat("modality", "object"),
        status=cat("status", "object"),
        measures={
            name: np.concatenate([p.measures[name] for p in parts])
            if parts
            else np.empty(0, "float64")
            for name, _ in MEASURES
        },
        starts=starts,
        lengths=lengths,
        values=np.concatenate([p.values for p in parts]) if parts else _EMPTY,
    )


class RollupMirror:
    """The rollup cells of each database in memory, refreshed hour by hour (a bounded,
    read-only, process-wide cache shared by every session).

    Each query asks the database for the totals of `call_rollup` (one cheap aggregate);
    if they changed, for every hour's totals (one small GROUP BY), and hours whose totals
    differ from the cached ones are read again, the rest is reused. Rows are never
    updated or deleted, so counts only grow, and an hour with the same totals holds
    exactly the same calls. Only databases whose latencies fit the budget are kept
    (least recently used first out); a larger one is read afresh, hour range by hour
    range, on every query.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._lock = threading.Lock()
        self._refresh_locks: dict[str, threading.Lock] = {}

    def clear(self) -> None:
        with self._lock:
            self._snapshots.clear()

    def forget_answers(self) -> None:
        """Drop the answers kept with the cached snapshots (benchmarks time computing)."""
        with self._lock:
            for snapshot in self._snapshots.values():
                snapshot.derived.clear()

    def snapshot(
        self, session: Session, start: datetime | None = None, end: datetime | None = None
    ) -> Snapshot:
        """Every cell as this session sees them (ordered by hour). A database too big for
        the budget is not kept: then only the hours in [start, end) are read."""
        database = instance(session)
        with self._lock:
            current = self._snapshots.get(database)
            if current is not None:
                self._snapshots.move_to_end(database)
        if current is not None and _totals(session) == _totals_of(current.versions):
            return current  # counts only grow: the same totals mean nothing changed
        versions = _hour_versions(session)
        if current is not None and current.versions == versions:
            return current
        if sum(v[1] for v in versions.values()) * 8 > self.max_bytes:
            hours = _hours_between(versions, start, end)
            return _read_hours(session, hours, sum(versions[h][1] for h in hours))
        # One refresh of a database at a time: queries started together on a cold cache
        # (a dashboard tab asks for all of its data at once, while the start-up warm-up
        # may still be reading) wait for the read under way and reuse it, rather than
        # each reading every cell again at the same time (time, and memory at the peak).
        with self._refreshing(database):
            with self._lock:
                current = self._snapshots.get(database, current)
            if current is not None and current.versions == versions:
                return current
            previous = current
            current = self._refresh(session, current, versions)
            self._keep(database, current)
        if len(current.values) - (0 if previous is None else len(previous.values)) >= TRIM_AFTER:
            memory.trim()  # the read's temporary rows and arrays, freed but kept by malloc
        return current

    def _refreshing(self, database: str) -> threading.Lock:
        with self._lock:
            return self._refresh_locks.setdefault(database, threading.Lock())

    def _keep(self, database: str, current: Snapshot) -> None:
        with self._lock:
            self._snapshots[database] = current
            self._snapshots.move_to_end(database)
            while len(self._snapshots) > 1 and self._bytes() > self.max_bytes:
                self._snapshots.popitem(last=False)

    def _bytes(self) -> int:
        return sum(s.values.nbytes for s in self._snapshots.values())

    @staticmethod
    def _refresh(
        session: Session, current: Snapshot | None, versions: dict[int, tuple[int, int, int]]
    ) -> Snapshot:
        """`current` with the hours whose totals changed read again."""
        if current is None:
            fresh = _read_hours(session, None, sum(v[1] for v in versions.values()))
            return replace(fresh, versions=_versions_of(fresh))
        changed = {h for h, v in versions.items() if current.versions.get(h) != v}
        fresh = _read_hours(session, sorted(changed), sum(versions[h][1] for h in changed))
        keep = np.nonzero(np.isin(current.epoch, [h for h in versions if h not in changed]))[0]
        merged = _concat([current.take(keep), fresh], {})
        if len(merged) and np.any(np.diff(merged.epoch) < 0):
            merged = merged.take(np.argsort(merged.epoch, kind="stable"))
        merged.values.flags.writeable = False
        return replace(merged, versions=_versions_of(merged))


def _versions_of(snapshot: Snapshot) -> dict[int, tuple[int, int, int]]:
    """Each hour's (calls, latencies, cells) totals, computed from the cells themselves."""
    result = {}
    for hour, (a, b) in snapshot.hour_slices().items():
        result[hour] = (
            int(snapshot.measures["calls"][a:b].sum()),
            int(snapshot.measures["latency_count"][a:b].sum()),
            b - a,
        )
    return result


def _hours_between(
    versions: dict[int, tuple[int, int, int]], start: datetime | None, end: datetime | None
) -> list[int]:
    lo = -(2**62) if start is None else int(start.timestamp())
    hi = 2**62 if end is None else int(end.timestamp())
    return sorted(h for h in versions if lo <= h < hi)


def _epoch_sql(dialect: str, column: str) -> str:
    if dialect == "postgresql":
        return f"CAST(extract(epoch FROM {column}) AS BIGINT)"
    return f"CAST(strftime('%s', {column}) AS INTEGER)"


def _totals(session: Session) -> tuple[int, int, int]:
    """(calls, latencies, cells) over all of `call_rollup`: one cheap aggregate."""
    row = session.execute(
        text(
            "SELECT coalesce(sum(calls), 0), coalesce(sum(latency_count), 0), count(*) "
            "FROM call_rollup"
        )
    ).one()
    return int(row[0]), int(row[1]), int(row[2])


def _totals_of(versions: dict[int, tuple[int, int, int]]) -> tuple[int, int, int]:
    return (
        sum(v[0] for v in versions.values()),
        sum(v[1] for v in versions.values()),
        sum(v[2] for v in versions.values()),
    )


def _hour_versions(session: Session) -> dict[int, tuple[int, int, int]]:
    """Every hour's (calls, latencies, cells) totals in `call_rollup`."""
    epoch = _epoch_sql(session.get_bind().dialect.name, "bucket")
    rows = session.execute(
        text(
            f"SELECT {epoch}, sum(calls), sum(latency_count), count(*) FROM call_rollup "
            "GROUP BY bucket"
        )
    )
    return {int(h): (int(c), int(n), int(k)) for h, c, n, k in rows}


_CELL_COLUMNS = ("provider", "model", "modality", "status", *(name for name, _ in MEASURES))


def _read_hours(
    session: Session, hours: Sequence[int] | None, expected_values: int = 0
) -> Snapshot:
    """The cells of these hours (all when None) with their latencies, ordered by hour.

    `expected_values`: how many latencies those hours held when their totals were read.
    The latencies are copied straight into one array of that size, a batch of cells at a
    time, so a read holds the merged array plus one batch, not two copies of everything
    (calls recorded meanwhile grow the array).
    """
    dialect = session.get_bind().dialect.name
    epoch = _epoch_sql(dialect, "bucket")
    columns = ", ".join(_CELL_COLUMNS)
    sql = (
        f"SELECT {epoch}, {columns}, latencies_count, latencies FROM call_rollup "
        "{where} ORDER BY bucket, id"
    )
    batches: list[_CellBatch] = []
    values = np.empty(expected_values, dtype="<f8")
    filled = 0
    for rows in _row_batches(session, sql, epoch, hours):
        batch = _cell_batch(session, rows)
        for array in batch.arrays:
            values, filled = _put(values, filled, array)
        batches.append(replace(batch, arrays=[]))  # the batch's blobs can go now
    values = values[:filled]
    values.flags.writeable = False
    epochs = _cat([b.epochs for b in batches], "int64")
    lengths = _cat([b.lengths for b in batches], "int64")
    starts = np.zeros(len(lengths), dtype="int64")
    if len(lengths):
        np.cumsum(lengths[:-1], out=starts[1:])
    text = {
        name: np.asarray([v for b in batches for v in b.text[name]], dtype=object)
        for name in ("provider", "model", "modality", "status")
    }
    return Snapshot(
        versions={},
        epoch=epochs,
        **text,
        measures={
            name: _cat(
                [b.measures[name] for b in batches],
                "float64" if name in ("latency_sum", "cost_sum") else "int64",
            )
            for name, _ in MEASURES
        },
        starts=starts,
        lengths=lengths,
        values=values,
    )


def _put(buffer: np.ndarray, filled: int, array: np.ndarray) -> tuple[np.ndarray, int]:
    """`array` written at `filled` in `buffer` (grown when it is full); the new fill."""
    end = filled + len(array)
    if end > len(buffer):
        grown = np.empty(max(end, len(buffer) + len(buffer) // 4 + 1024), dtype="<f8")
        grown[:filled] = buffer[:filled]
        buffer = grown
    buffer[filled:end] = array
    return buffer, end


ROWS_PER_BATCH = 5000  # cells read (and their latency blobs held as bytes) at a time


@dataclass(frozen=True)
class _CellBatch:
    epochs: np.ndarray
    text: dict[str, list[str]]
    measures: dict[str, np.ndarray]
    lengths: np.ndarray
    arrays: list[np.ndarray]  # each cell's latencies (views of the fetched blobs)


def _cat(arrays: Sequence[np.ndarray], dtype: str) -> np.ndarray:
    if not arrays:
        return np.empty(0, dtype=dtype)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _row_batches(
    session: Session, sql: str, epoch: str, hours: Sequence[int] | None
) -> Iterable[list[Any]]:
    """The cells' rows, a batch at a time: only one batch of latency blobs is held as
    Python bytes (those are many separate allocations; the merged arrays are few)."""
    if hours is not None and not hours:
        return
    if session.get_bind().dialect.name == "postgresql":
        connection = session.connection().connection.driver_connection
        # A server-side cursor: the result is not held whole in the client either.
        with connection.cursor(name="sqllm_rollup_cells", binary=True) as cursor:  # type: ignore[union-attr]
            if hours is None:
                cursor.execute(sql.format(where=""))
            else:
                cursor.execute(sql.format(where=f"WHERE {epoch} = ANY(%s)"), [list(hours)])
            while rows := cursor.fetchmany(ROWS_PER_BATCH):
                yield rows
        return
    connection = session.connection()
    if hours is None:
        result = connection.exec_driver_sql(sql.format(where=""))
        while rows := result.fetchmany(ROWS_PER_BATCH):
            yield list(rows)
        return
    for first in range(0, len(hours), 500):
        part = list(hours[first : first + 500])
        marks = ", ".join("?" for _ in part)
        yield list(
            connection.exec_driver_sql(
                sql.format(where=f"WHERE {epoch} IN ({marks})"), tuple(part)
            ).all()
        )


def _cell_batch(session: Session, rows: Sequence[Any]) -> _CellBatch:
    """Columns of one batch of cell rows, with each cell's latencies."""
    columns_of = list(zip(*rows, strict=True))
    epochs = np.asarray(columns_of[0], dtype="int64")
    named = dict(zip(_CELL_COLUMNS, columns_of[1:], strict=False))
    measures = {
        name: np.asarray(
            named[name], dtype="float64" if name in ("latency_sum", "cost_sum") else "int64"
        )
        for name, _ in MEASURES
    }
    counts = measures["latency_count"]
    stored = columns_of[-2]
    blobs = columns_of[-1]
    arrays = []
    for i in range(len(rows)):
        if not counts[i]:
            arrays.append(_EMPTY)
        elif stored[i] == counts[i] and blobs[i] is not None:
            arrays.append(np.frombuffer(blobs[i], dtype="<f8"))
        else:  # behind its counts: read the cell from raw_calls
            arrays.append(
                _cell_latencies(
                    session,
                    datetime.fromtimestamp(int(epochs[i]), UTC),
                    named["provider"][i],
                    named["model"][i],
                    named["modality"][i],
                    named["status"][i],
                )
            )
    lengths = np.fromiter((len(a) for a in arrays), dtype="int64", count=len(arrays))
    return _CellBatch(
        epochs=epochs,
        text={name: list(named[name]) for name in ("provider", "model", "modality", "status")},
        measures=measures,
        lengths=lengths,
        arrays=arrays,
    )


MIRROR = RollupMirror()
_warming: set[str] = set()
_warming_lock = threading.Lock()


def warm_up(engine: Engine, then: Callable[[], object] | None = None) -> None:
    """Read the rollups of `engine`'s database into `MIRROR` in a background thread, once
    per database per process, so that the first dashboard query finds them there; then
    call `then` in that thread (to compute answers that will be asked for first). Any
    error is left to the first real query to report."""
    key = engine.url.render_as_string(hide_password=True)
    with _warming_lock:
        if key in _warming:
            return
        _warming.add(key)

    def read() -> None:
        from study_query_llm.db.connection import UnitOfWork

        try:
            with UnitOfWork(engine) as uow:
                MIRROR.snapshot(uow.session)
            if then is not None:
                then()
        except Exception:  # e.g. not migrated yet: the first real query will say so
            log.debug("warming the rollup cache failed", exc_info=True)

    threading.Thread(target=read, name="rollup-warm-up", daemon=True).start()


def instance(session: Session) -> str:
    """This database's name for the cache: its URL and the token in `rollup_state`."""
    token = session.scalar(select(RollupState.instance).where(RollupState.id == 1)) or ""
    url = session.get_bind().url.render_as_string(hide_password=True)
    return f"{url}#{token}"
