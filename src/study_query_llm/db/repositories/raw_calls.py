"""`RawCallRepository`: record calls, read them back page by page, aggregate and search."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, insert, select, text
from sqlalchemy.orm import Session

from study_query_llm.db import aggregates, rollup_read, rollups, search, search_index
from study_query_llm.db.aggregates import Bucket, CallStats, GroupBy
from study_query_llm.db.bulk import allocate_ids, id_ranges, insert_rows
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import BulkInsertRange, RawCall
from study_query_llm.db.pagination import Cursor, Page, keyset_page
from study_query_llm.db.records import NewCall
from study_query_llm.db.search import SearchHit

if TYPE_CHECKING:
    import pandas as pd

NO_FILTERS = CallFilters()


_RANGES = BulkInsertRange.__table__
_MARK_RANGES = insert(_RANGES)
_UNMARK_RANGES = delete(_RANGES).where(_RANGES.c.first_id.in_(bindparam("firsts", expanding=True)))


class RawCallRepository:
    """Reads and appends `raw_calls` rows (which the database never lets change)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, call: NewCall | Mapping[str, Any]) -> int:
        """Record one call; returns its id."""
        return self.add_many([call])[0]

    def add_many(
        self,
        calls: Iterable[NewCall | Mapping[str, Any]],
        *,
        defer_search_index: bool = False,
    ) -> list[int]:
        """Record many calls in one batch; returns their ids in input order.

        The batch goes in with one statement (PostgreSQL: COPY), and its hourly rollups
        and search index entries are added in the same transaction, once per batch
        rather than once per row. `defer_search_index=True` leaves the search index to
        `search_index.catch_up` (search still finds the calls meanwhile): for bulk loads,
        where indexing text costs several times more than storing the calls.
        """
        rows = [NewCall.row_of(call) for call in calls]
        if not rows:
            return []
        session = self.session
        connection = session.connection()  # plain statements below: no ORM work per batch
        sqlite = connection.dialect.name == "sqlite"
        ids = allocate_ids(session, RawCall, len(rows))
        ranges = id_ranges(ids)
        if sqlite:  # the per-row triggers skip these ids; this batch is done below
            connection.execute(_MARK_RANGES, [{"first_id": a, "last_id": b} for a, b in ranges])
        elif defer_search_index:  # the search trigger skips this transaction's rows
            session.execute(text("SELECT set_config('sqllm.defer_search_index', 'on', true)"))
        if defer_search_index:
            search_index.defer(session, ranges)
        insert_rows(session, RawCall, rows, ids=ids)
        if sqlite:
            for first, last in ranges:
                rollups.add_range(session, first, last)
                if not defer_search_index:
                    search_index.index_range(session, first, last)
            connection.execute(_UNMARK_RANGES, {"firsts": [a for a, _ in ranges]})
        elif defer_search_index:
            session.execute(text("SELECT set_config('sqllm.defer_search_index', 'off', true)"))
        rollups.merge_latencies(session, rows)
        return ids

    def get(self, call_id: int) -> RawCall | None:
        """The call with this id, or None."""
        return self.session.get(RawCall, call_id)

    def get_many(self, call_ids: Sequence[int]) -> list[RawCall]:
        """The calls with these ids, in the order given (unknown ids are left out)."""
        if not call_ids:
            return []
        found = {
            c.id: c for c in self.session.scalars(select(RawCall).where(RawCall.id.in_(call_ids)))
        }
        return [found[i] for i in call_ids if i in found]

    def query(
        self,
        filters: CallFilters = NO_FILTERS,
        limit: int = 100,
        after: Cursor | str | None = None,
    ) -> Page[RawCall]:
        """One page of matching calls, newest first; pass `page.next_cursor` as `after`."""
        stmt = select(RawCall).where(*filters.conditions())
        return keyset_page(
            self.session, stmt, RawCall.created_at, RawCall.id, limit=limit, after=after
        )

    def count(self, filters: CallFilters = NO_FILTERS) -> int:
        """How many calls match (from the hourly rollups where they can answer)."""
        counted = rollup_read.count(self.session, filters)
        if counted is not None:
            return counted
        stmt = select(func.count()).select_from(RawCall).where(*filters.conditions())
        return int(self.session.scalar(stmt) or 0)

    def find_by_request_hash(
        self, request_hash: str, *, model: str | None = None, status: str | None = "success"
    ) -> RawCall | None:
        """The newest call with this request hash (and model and status, when given)."""
        stmt = select(RawCall).where(RawCall.request_hash == request_hash)
        if model is not None:
            stmt = stmt.where(RawCall.model == model)
        if status is not None:
            stmt = stmt.where(RawCall.status == status)
        stmt = stmt.order_by(RawCall.created_at.desc(), RawCall.id.desc()).limit(1)
        return self.session.scalars(stmt).first()

    def summary(self, filters: CallFilters = NO_FILTERS) -> CallStats:
        """Aggregates over every matching call (see `study_query_llm.db.aggregates`)."""
        return aggregates.summary(self.session, filters)

    def by_provider_model(self, filters: CallFilters = NO_FILTERS) -> list[CallStats]:
        """Aggregates per (provider, model)."""
        return aggregates.by_provider_model(self.session, filters)

    def time_buckets(
        self,
        filters: CallFilters = NO_FILTERS,
        bucket: Bucket = "hour",
        by: GroupBy = None,
    ) -> list[CallStats]:
        """Aggregates per UTC minute/hour/day/week bucket, optionally per provider or model."""
        return aggregates.time_buckets(self.session, filters, bucket, by)

    def stats_frame(
        self,
        filters: CallFilters = NO_FILTERS,
        by: tuple[str, ...] = (),
        bucket: Bucket = "hour",
    ) -> pd.DataFrame:
        """The aggregates grouped by `by` (of "bucket", "provider", "model") as a frame
        with one column per `CallStats` field (see `aggregates.stats_frame`)."""
        return aggregates.stats_frame(self.session, filters, by, bucket)

    def search(
        self, text: str, filters: CallFilters = NO_FILTERS, limit: int = 50
    ) -> list[SearchHit]:
        """Full-text search with ranked, marked snippets (see `study_query_llm.db.search`)."""
        return search.search_calls(self.session, text, filters, limit)
