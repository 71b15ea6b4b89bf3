"""Filter objects shared by every query, aggregate and search method.

Each filter is a frozen (hashable) dataclass, so callers can use it as a cache key.
`start` is inclusive and `end` exclusive; empty tuples and None mean "no restriction".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import aliased

from study_query_llm.db.column_types import as_utc
from study_query_llm.db.models_v1 import InferenceRun
from study_query_llm.db.models_v2 import GroupMember, RawCall


def _as_tuple(values: Iterable[str] | str | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,)
    return tuple(values)


@dataclass(frozen=True)
class CallFilters:
    """Which `raw_calls` rows a query, aggregate or search looks at."""

    start: datetime | None = None
    end: datetime | None = None
    providers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    modality: str | None = None
    status: str | None = None
    group_id: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (or one string) from callers and keep the object hashable.
        object.__setattr__(self, "providers", _as_tuple(self.providers))
        object.__setattr__(self, "models", _as_tuple(self.models))
        if self.start is not None:
            object.__setattr__(self, "start", as_utc(self.start))
        if self.end is not None:
            object.__setattr__(self, "end", as_utc(self.end))

    def conditions(self) -> list[ColumnElement[bool]]:
        """WHERE conditions on `RawCall` for these filters (ANDed together)."""
        conds: list[ColumnElement[bool]] = []
        if self.start is not None:
            conds.append(RawCall.created_at >= self.start)
        if self.end is not None:
            conds.append(RawCall.created_at < self.end)
        if self.providers:
            conds.append(RawCall.provider.in_(self.providers))
        if self.models:
            conds.append(RawCall.model.in_(self.models))
        if self.modality is not None:
            conds.append(RawCall.modality == self.modality)
        if self.status is not None:
            conds.append(RawCall.status == self.status)
        if self.group_id is not None:
            # An alias, so that the test stays whole in queries that join group_members.
            member = aliased(GroupMember)
            conds.append(
                exists(
                    select(member.id).where(
                        member.group_id == self.group_id,
                        member.call_id == RawCall.id,
                    )
                )
            )
        return conds


@dataclass(frozen=True)
class RunFilters:
    """Which v1 `inference_runs` rows a query looks at."""

    start: datetime | None = None
    end: datetime | None = None
    providers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    batch_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", _as_tuple(self.providers))
        object.__setattr__(self, "models", _as_tuple(self.models))
        if self.start is not None:
            object.__setattr__(self, "start", as_utc(self.start))
        if self.end is not None:
            object.__setattr__(self, "end", as_utc(self.end))

    def conditions(self) -> list[ColumnElement[bool]]:
        """WHERE conditions on `InferenceRun` for these filters (ANDed together)."""
        conds: list[ColumnElement[bool]] = []
        if self.start is not None:
            conds.append(InferenceRun.created_at >= self.start)
        if self.end is not None:
            conds.append(InferenceRun.created_at < self.end)
        if self.providers:
            conds.append(InferenceRun.provider.in_(self.providers))
        if self.models:
            conds.append(InferenceRun.model.in_(self.models))
        if self.batch_id is not None:
            conds.append(InferenceRun.batch_id == self.batch_id)
        return conds
