"""Check that a v1 import is complete and exact: counts, batches, order, times, sampled rows.

```python
with LegacyDatabase("sqlite:///old/app.db") as legacy:
    report = BackfillValidator(legacy, get_engine(target_url), sample=500).run()
print(report.render()); sys.exit(0 if report.ok else 1)
```

The target is only read. Every check compares the legacy rows with what the import
record (`legacy_calls`, `legacy_batches`) points at in the target:

- rows: every legacy row has exactly one v2 call, and every such call exists;
- batches: one batch group per legacy `batch_id`, with as many members as the batch has rows;
- order: each group's members are the batch's rows in original order (created_at, id);
- timestamps: the earliest and latest `created_at` agree;
- sample: a seeded random sample of rows (or every row, with `full=True`) agrees field by
  field: prompt, response, provider, model, tokens, latency, created_at, status and metadata.

Differences the import makes on purpose are expected, not reported: NUL characters
stored as U+FFFD, and a missing provider or model stored as ``"unknown"``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, func, inspect, select

from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.legacy import LegacyDatabase, LegacyRow
from study_query_llm.db.models_legacy import LegacyBatch, LegacyCall, LegacySource
from study_query_llm.db.models_v2 import GroupMember, RawCall
from study_query_llm.services.legacy_import import (
    LEGACY_KEY,
    UNKNOWN,
    original_metadata,
    storable,
    storable_json,
)

RECORD_TABLES = ("legacy_sources", "legacy_calls", "legacy_batches")
CHUNK = 2000


@dataclass
class Check:
    """One comparison: its name, whether it passed, a one-line summary and any details."""

    name: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    """Every check of one validation run."""

    source: str
    source_url: str
    target_url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.ok]

    def render(self) -> str:
        """The report as text for a terminal."""
        lines = [
            f"v1 -> v2 backfill check: {self.source_url} -> {self.target_url}",
            f"source: {self.source}",
        ]
        for check in self.checks:
            mark = "ok      " if check.ok else "MISMATCH"
            lines.append(f"  {mark}  {check.name:<10} {check.summary}")
            lines.extend(f"{'':<22}- {detail}" for detail in check.details)
        if self.ok:
            lines.append("result: v1 and v2 agree")
        else:
            lines.append(f"result: {len(self.failed)} check(s) failed: {', '.join(self.failed)}")
        return "\n".join(lines)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt_time(value: datetime | None) -> str:
    return "—" if value is None else value.isoformat().replace("+00:00", "Z")


class _Details:
    """Collects up to `limit` detail lines and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: list[str] = []
        self.count = 0

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.lines) < self.limit:
            self.lines.append(line)

    def done(self) -> list[str]:
        more = self.count - len(self.lines)
        return self.lines + ([f"... and {more} more"] if more > 0 else [])


class BackfillValidator:
    """Compares a legacy database with the v2 rows an import made from it."""

    def __init__(
        self,
        legacy: LegacyDatabase,
        engine: Engine,
        *,
        source_name: str | None = None,
        sample: int = 200,
        seed: int = 0,
        full: bool = False,
        detail_limit: int = 10,
    ) -> None:
        if sample < 0:
            raise ValueError("the sample size must not be negative")
        self.legacy = legacy
        self.engine = engine
        self.source_name = (source_name or "").strip() or legacy.identity
        self.sample = sample
        self.seed = seed
        self.full = full
        self.detail_limit = detail_limit

    def run(self) -> ValidationReport:
        """Run every check (the target is only read)."""
        report = ValidationReport(
            source=self.source_name,
            source_url=self.legacy.shown,
            target_url=self.engine.url.render_as_string(hide_password=True),
        )
        with UnitOfWork(self.engine) as uow:
            self.session = uow.session
            source_pk = self._source_pk()
            if source_pk is None:
                report.checks.append(
                    Check(
                        "import",
                        False,
                        f"the target holds no import of {self.source_name!r}: run the import "
                        "first (or pass the --source-name it used)",
                    )
                )
                return report
            self.source_pk = source_pk
            report.checks.append(self._check_rows())
            report.checks.extend(self._check_batches())
            report.checks.append(self._check_times())
            report.checks.append(self._check_sample())
        return report

    def _source_pk(self) -> int | None:
        names = set(inspect(self.session.connection()).get_table_names())
        if not set(RECORD_TABLES) <= names:
            return None
        return self.session.scalar(
            select(LegacySource.id).where(LegacySource.name == self.source_name)
        )

    # --- rows --------------------------------------------------------------------------------

    def _check_rows(self) -> Check:
        source_rows = self.legacy.count()
        mapped = int(
            self.session.scalar(
                select(func.count())
                .select_from(LegacyCall)
                .where(LegacyCall.source_id == self.source_pk)
            )
            or 0
        )
        dangling_stmt = (
            select(LegacyCall.legacy_id, LegacyCall.call_id)
            .outerjoin(RawCall, RawCall.id == LegacyCall.call_id)
            .where(LegacyCall.source_id == self.source_pk, RawCall.id.is_(None))
            .order_by(LegacyCall.legacy_id)
        )
        dangling = self.session.execute(dangling_stmt.limit(self.detail_limit + 1)).all()
        present = mapped
        if dangling:
            present = mapped - int(
                self.session.scalar(select(func.count()).select_from(dangling_stmt.subquery())) or 0
            )
        summary = f"{source_rows:,} v1 rows, {present:,} v2 calls"
        details = _Details(self.detail_limit)
        for legacy_id, side in self._id_differences():  # equal counts can hide a swap
            if side == "v1":
                details.add(f"v1 row {legacy_id} has no v2 call")
            else:
                details.add(f"v2 record of v1 row {legacy_id}, which the source does not have")
        for legacy_id, call_id in dangling[: self.detail_limit]:
            details.add(f"v1 row {legacy_id}: its v2 call {call_id} is missing from raw_calls")
        ok = source_rows == mapped == present and details.count == 0
        return Check("rows", ok, summary, details.done())

    def _id_differences(self) -> Iterator[tuple[int, str]]:
        """Ids only in the source ("v1") or only in the import record ("v2"), in order."""

        def mapped_ids() -> Iterator[int]:
            last = None
            while True:
                stmt = (
                    select(LegacyCall.legacy_id)
                    .where(LegacyCall.source_id == self.source_pk)
                    .order_by(LegacyCall.legacy_id)
                    .limit(CHUNK)
                )
                if last is not None:
                    stmt = stmt.where(LegacyCall.legacy_id > last)
                chunk = list(self.session.scalars(stmt))
                if not chunk:
                    return
                yield from chunk
                last = chunk[-1]

        source = itertools.chain.from_iterable(self.legacy.id_chunks(CHUNK))
        yield from _merge_differences(source, mapped_ids())

    # --- batches and order -------------------------------------------------------------------

    def _batch_key(self) -> ColumnElement[Any]:
        key = LegacyBatch.batch_id
        return key.collate("C") if self.engine.dialect.name == "postgresql" else key

    def _check_batches(self) -> list[Check]:
        sizes = _Details(self.detail_limit)
        order = _Details(self.detail_limit)
        source_batches = target_batches = 0
        source_groups = _grouped((storable(b) or "", i) for b, i, _ in self.legacy.batch_entries())
        target_groups = _grouped(self._target_member_rows())
        for batch_id, source_ids, target_ids in _merge_groups(source_groups, target_groups):
            if source_ids is not None:
                source_batches += 1
            if target_ids is not None:
                target_batches += 1
            if target_ids is None:
                sizes.add(f"batch {_short(batch_id)}: no v2 group ({len(source_ids or [])} rows)")
                continue
            if source_ids is None:
                sizes.add(f"v2 group of batch {_short(batch_id)}, which the source does not have")
                continue
            if len(source_ids) != len(target_ids):
                sizes.add(
                    f"batch {_short(batch_id)}: {len(source_ids)} v1 rows, "
                    f"{len(target_ids)} v2 members"
                )
            for position, (want, got) in enumerate(zip(source_ids, target_ids, strict=False)):
                if want != got:
                    shown = "a call not from this source" if got is None else f"v1 row {got}"
                    order.add(
                        f"batch {_short(batch_id)}: position {position} holds {shown}, "
                        f"expected v1 row {want}"
                    )
                    break
        size_check = Check(
            "batches",
            sizes.count == 0,
            f"{source_batches:,} v1 batches, {target_batches:,} v2 batch groups"
            + (", sizes match" if sizes.count == 0 else ""),
            sizes.done(),
        )
        order_check = Check(
            "order",
            order.count == 0,
            "members in original order (created_at, id)"
            if order.count == 0
            else f"{order.count:,} batch group(s) out of order",
            order.done(),
        )
        return [size_check, order_check]

    def _target_member_rows(self) -> Iterator[tuple[str, int | None]]:
        stmt = (
            select(LegacyBatch.batch_id, GroupMember.id, LegacyCall.legacy_id)
            .select_from(LegacyBatch)
            .outerjoin(GroupMember, GroupMember.group_id == LegacyBatch.group_id)
            .outerjoin(
                LegacyCall,
                (LegacyCall.call_id == GroupMember.call_id)
                & (LegacyCall.source_id == LegacyBatch.source_id),
            )
            .where(LegacyBatch.source_id == self.source_pk)
            .order_by(self._batch_key(), GroupMember.position, GroupMember.id)
        )
        result = self.session.execute(stmt, execution_options={"yield_per": CHUNK})
        for batch_id, member_id, legacy_id in result:
            # An empty group still gives one row from the outer join, with no member.
            yield batch_id, (legacy_id if member_id is not None else _EMPTY)

    # --- timestamps --------------------------------------------------------------------------

    def _check_times(self) -> Check:
        source = self.legacy.time_range()
        low, high = self.session.execute(
            select(func.min(RawCall.created_at), func.max(RawCall.created_at))
            .join(LegacyCall, LegacyCall.call_id == RawCall.id)
            .where(LegacyCall.source_id == self.source_pk)
        ).one()
        target = None if low is None else (low, high)
        if source == target:
            if source is None:
                return Check("timestamps", True, "no rows on either side")
            return Check(
                "timestamps", True, f"{_fmt_time(source[0])} .. {_fmt_time(source[1])} on both"
            )
        s_low, s_high = source or (None, None)
        t_low, t_high = target or (None, None)
        return Check(
            "timestamps",
            False,
            "the time ranges differ",
            [
                f"v1: {_fmt_time(s_low)} .. {_fmt_time(s_high)}",
                f"v2: {_fmt_time(t_low)} .. {_fmt_time(t_high)}",
            ],
        )

    # --- sampled rows ------------------------------------------------------------------------

    def _sample_ids(self) -> list[int]:
        bounds = self.legacy.id_range()
        if bounds is None or self.sample == 0:
            return []
        rng = random.Random(self.seed)
        chosen: dict[int, None] = {}
        for _ in range(self.sample * 3):
            if len(chosen) >= self.sample:
                break
            found = self.legacy.first_id_at_or_after(rng.randint(*bounds))
            if found is not None:
                chosen[int(found)] = None
        return sorted(chosen)

    def _check_sample(self) -> Check:
        details = _Details(self.detail_limit)
        compared = 0
        if self.full:
            chunks: Iterable[list[int]] = self.legacy.id_chunks(CHUNK)
            what = "every row"
        else:
            ids = self._sample_ids()
            chunks = (ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK))
            what = f"a sample of {len(ids):,} rows (seed {self.seed})"
        differing = 0
        for chunk in chunks:
            rows = self.legacy.rows_by_id(chunk)
            calls = self._calls_for(chunk)
            for legacy_id in chunk:
                compared += 1
                problems = _compare(rows[legacy_id], calls.get(legacy_id), self.source_name)
                if problems:
                    differing += 1
                    for problem in problems:
                        details.add(f"v1 row {legacy_id}: {problem}")
            self.session.expunge_all()  # --full: keep memory flat
        if compared == 0:
            return Check("sample", True, "no rows to compare")
        if differing == 0:
            return Check("sample", True, f"{what}: all fields identical")
        return Check("sample", False, f"{what}: {differing:,} row(s) differ", details.done())

    def _calls_for(self, legacy_ids: list[int]) -> dict[int, RawCall | int]:
        """The v2 call of each legacy id; the bare call id where that row is missing."""
        pairs = self.session.execute(
            select(LegacyCall.legacy_id, LegacyCall.call_id, RawCall)
            .outerjoin(RawCall, RawCall.id == LegacyCall.call_id)
            .where(LegacyCall.source_id == self.source_pk, LegacyCall.legacy_id.in_(legacy_ids))
        ).all()
        return {
            legacy_id: call if call is not None else call_id for legacy_id, call_id, call in pairs
        }


_EMPTY: Any = object()


def _compare(row: LegacyRow, call: RawCall | int | None, source: str) -> list[str]:
    """What differs between a legacy row and its v2 call (empty when nothing does)."""
    if call is None:
        return ["has no v2 call"]
    if isinstance(call, int):
        return [f"its v2 call {call} is missing from raw_calls"]
    expected: dict[str, Any] = {
        "request_json": {"prompt": storable(row.prompt)},
        "response_json": {"text": storable(row.response)},
        "provider": storable(row.provider) or UNKNOWN,
        "model": storable(row.model) or UNKNOWN,
        "status": "success",
        "modality": "chat",
        "total_tokens": row.tokens,
        "latency_ms": row.latency_ms,
        "created_at": row.created_at,
    }
    problems = []
    for name, want in expected.items():
        got = getattr(call, name)
        if got != want:
            problems.append(f"{name} differs (call {call.id}): v1 {_short(want)}, v2 {_short(got)}")
    meta = call.metadata_json
    if not isinstance(meta, dict) or not isinstance(meta.get(LEGACY_KEY), dict):
        problems.append(f"metadata of call {call.id} has no {LEGACY_KEY!r} record")
        return problems
    provenance = meta[LEGACY_KEY]
    if provenance.get("id") != row.id or provenance.get("source") != source:
        problems.append(
            f"call {call.id} says it came from row {provenance.get('id')!r} of "
            f"{provenance.get('source')!r}"
        )
    want_meta, got_meta = storable_json(row.metadata), original_metadata(meta)
    if got_meta != want_meta:
        problems.append(
            f"metadata differs (call {call.id}): v1 {_short(want_meta)}, v2 {_short(got_meta)}"
        )
    return problems


def _merge_differences(left: Iterator[int], right: Iterator[int]) -> Iterator[tuple[int, str]]:
    """Values only in `left` ("v1") or only in `right` ("v2"); both must be sorted."""
    a, b = next(left, None), next(right, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a < b):
            yield a, "v1"  # type: ignore[misc]
            a = next(left, None)
        elif a is None or b < a:
            yield b, "v2"
            b = next(right, None)
        else:
            a, b = next(left, None), next(right, None)


def _grouped(pairs: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, list[Any]]]:
    """(key, [values]) for runs of equal keys; `_EMPTY` values are dropped."""
    for key, items in itertools.groupby(pairs, key=lambda pair: pair[0]):
        yield key, [value for _, value in items if value is not _EMPTY]


def _merge_groups(
    left: Iterator[tuple[str, list[Any]]], right: Iterator[tuple[str, list[Any]]]
) -> Iterator[tuple[str, list[Any] | None, list[Any] | None]]:
    """Join two key-sorted group streams: (key, left values or None, right values or None)."""
    a, b = next(left, None), next(right, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield a[0], a[1], None
            a = next(left, None)
        elif a is None or b[0] < a[0]:
            yield b[0], None, b[1]
            b = next(right, None)
        else:
            yield a[0], a[1], b[1]
            a, b = next(left, None), next(right, None)
