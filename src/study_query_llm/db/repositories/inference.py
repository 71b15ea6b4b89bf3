"""`InferenceRepository`: the v1 `inference_runs` table, kept written for compatibility."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from study_query_llm.db.bulk import insert_rows
from study_query_llm.db.filters import RunFilters
from study_query_llm.db.models_v1 import InferenceRun
from study_query_llm.db.pagination import Cursor, Page, keyset_page
from study_query_llm.db.records import NewRun

NO_FILTERS = RunFilters()


class InferenceRepository:
    """Appends and reads v1 inference runs."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, run: NewRun | Mapping[str, Any]) -> int:
        """Record one run; returns its id."""
        return self.add_many([run])[0]

    def add_many(self, runs: Iterable[NewRun | Mapping[str, Any]]) -> list[int]:
        """Record many runs in one batched INSERT; returns their ids in input order."""
        rows = [NewRun.coerce(run).row() for run in runs]
        return insert_rows(self.session, InferenceRun, rows)

    def get(self, run_id: int) -> InferenceRun | None:
        """The run with this id, or None."""
        return self.session.get(InferenceRun, run_id)

    def query(
        self,
        filters: RunFilters = NO_FILTERS,
        limit: int = 100,
        after: Cursor | str | None = None,
    ) -> Page[InferenceRun]:
        """One page of matching runs, newest first; pass `page.next_cursor` as `after`."""
        stmt = select(InferenceRun).where(*filters.conditions())
        return keyset_page(
            self.session,
            stmt,
            InferenceRun.created_at,
            InferenceRun.id,
            limit=limit,
            after=after,
        )
