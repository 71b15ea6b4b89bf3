"""Read-only queries behind the dashboard that the other repositories do not answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Integer, and_, case, cast, distinct, func, select
from sqlalchemy.orm import Session

from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import EmbeddingVector, Group, GroupMember, RawCall


@dataclass(frozen=True)
class GroupStats:
    """A group with its member count and the aggregates of its calls."""

    id: int
    group_type: str
    name: str
    description: str | None
    created_at: datetime
    members: int
    calls: int
    failures: int
    failure_rate: float | None
    total_tokens: int
    cost_usd: float
    latency_mean_ms: float | None


@dataclass(frozen=True)
class StoredVector:
    """One stored embedding with what it embeds."""

    call_id: int
    provider: str
    model: str
    text: str
    vector: list[float]


class StudyQueries:
    """Counts, samples and joins for analytics views; every number comes from the database."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def distinct_counts(self, filters: CallFilters) -> tuple[int, int]:
        """How many distinct providers and (provider, model) pairs the matching calls use."""
        row = self.session.execute(
            select(
                func.count(distinct(RawCall.provider)),
                func.count(distinct(RawCall.provider + "/" + RawCall.model)),
            ).where(*filters.conditions())
        ).one()
        return int(row[0]), int(row[1])

    def facets(self) -> dict[str, list[str]]:
        """Every provider and model present in the record (for filter choices)."""
        providers = self.session.scalars(
            select(RawCall.provider).distinct().order_by(RawCall.provider)
        )
        models = self.session.scalars(select(RawCall.model).distinct().order_by(RawCall.model))
        return {"providers": list(providers), "models": list(models)}

    def latency_samples(self, filters: CallFilters, per_model: int = 2000) -> list[tuple[Any, ...]]:
        """Up to `per_model` newest successful latencies per (provider, model), for box plots."""
        ranked = (
            select(
                RawCall.provider,
                RawCall.model,
                RawCall.latency_ms,
                func.row_number()
                .over(
                    partition_by=(RawCall.provider, RawCall.model),
                    order_by=(RawCall.created_at.desc(), RawCall.id.desc()),
                )
                .label("n"),
            )
            .where(*filters.conditions(), RawCall.latency_ms.is_not(None))
            .where(RawCall.status == "success")
            .subquery()
        )
        stmt = (
            select(ranked.c.provider, ranked.c.model, ranked.c.latency_ms)
            .where(ranked.c.n <= per_model)
            .order_by(ranked.c.provider, ranked.c.model)
        )
        return [tuple(row) for row in self.session.execute(stmt)]

    def group_stats(
        self,
        group_type: str | None = None,
        group_ids: Sequence[int] = (),
        filters: CallFilters | None = None,
    ) -> list[GroupStats]:
        """Groups (newest first) with member counts and the aggregates of their calls.

        `members` counts every member; `calls` and the other aggregates count only the
        member calls that match `filters` (all of them when None). A group without
        matching calls has 0 calls, 0 failures and no failure rate or latency.
        """
        conditions = list(filters.conditions()) if filters is not None else []
        member_call = and_(RawCall.id == GroupMember.call_id, *conditions)
        failed = case((RawCall.id.is_(None), 0), (RawCall.status == "success", 0), else_=1)
        calls = func.count(RawCall.id)
        failures = func.coalesce(func.sum(cast(failed, Integer)), 0)
        stmt = (
            select(
                Group.id,
                Group.group_type,
                Group.name,
                Group.description,
                Group.created_at,
                func.count(GroupMember.id),
                calls,
                failures,
                cast(failures, Float) / func.nullif(calls, 0),
                func.coalesce(func.sum(RawCall.total_tokens), 0),
                func.coalesce(func.sum(RawCall.cost_usd), 0.0),
                cast(func.avg(cast(RawCall.latency_ms, Float)), Float),
            )
            .select_from(Group)
            .outerjoin(GroupMember, GroupMember.group_id == Group.id)
            .outerjoin(RawCall, member_call)
            .group_by(Group.id)
            .order_by(Group.created_at.desc(), Group.id.desc())
        )
        if group_type:
            stmt = stmt.where(Group.group_type == group_type)
        if group_ids:
            stmt = stmt.where(Group.id.in_(list(group_ids)))
        return [
            GroupStats(
                id=row[0],
                group_type=row[1],
                name=row[2],
                description=row[3],
                created_at=row[4],
                members=int(row[5]),
                calls=int(row[6]),
                failures=int(row[7]),
                failure_rate=None if row[8] is None else float(row[8]),
                total_tokens=int(row[9]),
                cost_usd=float(row[10]),
                latency_mean_ms=None if row[11] is None else float(row[11]),
            )
            for row in self.session.execute(stmt)
        ]

    def group_types(self) -> list[str]:
        """The group types present (for a type filter)."""
        return list(
            self.session.scalars(select(Group.group_type).distinct().order_by(Group.group_type))
        )

    def member_count(self, group_id: int) -> int:
        """How many calls the group has."""
        stmt = select(func.count(GroupMember.id)).where(GroupMember.group_id == group_id)
        return int(self.session.scalar(stmt) or 0)

    def group_calls(
        self, group_id: int, limit: int = 500, offset: int = 0
    ) -> list[tuple[Any, ...]]:
        """Member calls of a group in position order: (position, role, call)."""
        stmt = (
            select(GroupMember.position, GroupMember.role, RawCall)
            .join(RawCall, RawCall.id == GroupMember.call_id)
            .where(GroupMember.group_id == group_id)
            .order_by(GroupMember.position, GroupMember.id)
            .limit(limit)
            .offset(offset)
        )
        return [tuple(row) for row in self.session.execute(stmt)]

    def stored_vectors(
        self, model: str, *, group_id: int | None = None, limit: int = 20_000
    ) -> list[StoredVector]:
        """Vectors of `model`, each with the text it embeds and, for chat calls in a group,
        the provider/model of the embedded call (`embedding of <call>` in metadata)."""
        stmt = (
            select(
                RawCall.id,
                RawCall.provider,
                RawCall.model,
                RawCall.request_json,
                RawCall.metadata_json,
                EmbeddingVector.vector,
            )
            .join(EmbeddingVector, EmbeddingVector.call_id == RawCall.id)
            .where(EmbeddingVector.model == model, RawCall.status == "success")
            .order_by(RawCall.id)
            .limit(limit)
        )
        if group_id is not None:
            stmt = stmt.where(
                RawCall.id.in_(select(GroupMember.call_id).where(GroupMember.group_id == group_id))
            )
        out = []
        for call_id, provider, call_model, request, meta, vector in self.session.execute(stmt):
            meta = meta or {}
            out.append(
                StoredVector(
                    call_id=call_id,
                    provider=meta.get("source_provider", provider),
                    model=meta.get("source_model", call_model),
                    text=str((request or {}).get("input", "")),
                    vector=[float(x) for x in vector],
                )
            )
        return out
