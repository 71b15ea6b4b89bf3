"""Read-only queries behind the dashboard that the other repositories do not answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    String,
    Subquery,
    and_,
    case,
    cast,
    column,
    func,
    literal,
    literal_column,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, aliased
from sqlalchemy.types import UserDefinedType

from study_query_llm.db import rollup_read
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


TEXT_KINDS = ("response", "prompt")


@dataclass(frozen=True)
class EmbeddingRow:
    """A call (as a member of `group_id`, when groups were asked for), its text and the
    stored vector of that text (None when the text has not been embedded yet)."""

    group_id: int | None
    group: str | None
    call_id: int
    provider: str
    model: str
    status: str
    created_at: datetime
    text: str
    vector: list[float] | None


@dataclass(frozen=True)
class CallText:
    """A call's text and the names of the chosen groups it belongs to."""

    call_id: int
    provider: str
    model: str
    status: str
    created_at: datetime
    text: str
    groups: tuple[str, ...]


class _PgVector(UserDefinedType[Any]):
    """pgvector's ``vector`` type, for casts in similarity queries."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "vector"


class StudyQueries:
    """Counts, samples and joins for analytics views; every number comes from the database."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def distinct_counts(self, filters: CallFilters) -> tuple[int, int]:
        """How many distinct providers and (provider, model) pairs the matching calls use."""
        pairs = self.targets(filters)
        return len({provider for provider, _ in pairs}), len(pairs)

    def targets(self, filters: CallFilters) -> list[tuple[str, str]]:
        """The distinct (provider, model) pairs of the matching calls, in the database's
        order. From the hourly rollups where they can answer (see `rollup_read`)."""
        pairs = rollup_read.keys(self.session, filters)
        if pairs is None:
            stmt = select(RawCall.provider, RawCall.model).where(*filters.conditions()).distinct()
            pairs = {(provider, model) for provider, model in self.session.execute(stmt)}
        rank = rollup_read.collation_rank(self.session, [s for pair in pairs for s in pair])
        return sorted(pairs, key=lambda pair: (rank[pair[0]], rank[pair[1]]))

    def facets(self, filters: CallFilters = CallFilters()) -> dict[str, list[str]]:
        """The providers and models of the matching calls (for filter choices)."""
        pairs = self.targets(filters)
        rank = rollup_read.collation_rank(self.session, [s for pair in pairs for s in pair])
        providers = sorted({provider for provider, _ in pairs}, key=rank.__getitem__)
        models = sorted({model for _, model in pairs}, key=rank.__getitem__)
        return {"providers": providers, "models": models}

    def latency_samples(self, filters: CallFilters, per_model: int = 2000) -> list[tuple[Any, ...]]:
        """Up to `per_model` newest successful latencies per (provider, model), for box plots.

        One query: per (provider, model), a walk down the (provider, model, created_at)
        index that stops after `per_model` rows, rather than ranking every matching call.
        """
        pairs = self.targets(replace(filters, status=None))
        if not pairs or filters.status not in (None, "success"):
            return []
        parts = []
        for provider, model in pairs:
            newest = (
                select(RawCall.provider, RawCall.model, RawCall.latency_ms)
                .where(
                    *filters.conditions(),
                    RawCall.provider == provider,
                    RawCall.model == model,
                    RawCall.status == "success",
                    RawCall.latency_ms.is_not(None),
                )
                .order_by(RawCall.created_at.desc(), RawCall.id.desc())
                .limit(per_model)
                .subquery()
            )
            parts.append(select(newest))
        return [tuple(row) for row in self.session.execute(union_all(*parts))]

    def group_stats(
        self,
        group_type: str | None = None,
        group_ids: Sequence[int] = (),
        filters: CallFilters | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[GroupStats]:
        """Groups (newest first) with member counts and the aggregates of their calls.

        `members` counts every member; `calls` and the other aggregates count only the
        member calls that match `filters` (all of them when None). A group without
        matching calls has 0 calls, 0 failures and no failure rate or latency.
        `limit`/`offset`: one page of the groups, newest first; only that page's
        memberships are read (a record with millions of members lists a page quickly).
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
        page = self._groups_listed(group_type, group_ids)
        if limit is not None:
            if limit < 1 or offset < 0:
                raise ValueError("limit must be at least 1 and offset at least 0")
            page = page.order_by(Group.created_at.desc(), Group.id.desc())
            page = page.limit(limit).offset(offset)
        if limit is not None or group_type or group_ids:
            stmt = stmt.where(Group.id.in_(page.scalar_subquery()))
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

    def group_count(self, group_type: str | None = None, group_ids: Sequence[int] = ()) -> int:
        """How many groups `group_stats` would list (of this type, among these ids)."""
        listed = self._groups_listed(group_type, group_ids).subquery()
        return int(self.session.scalar(select(func.count()).select_from(listed)) or 0)

    @staticmethod
    def _groups_listed(group_type: str | None, group_ids: Sequence[int]) -> Select[Any]:
        stmt = select(Group.id)
        if group_type:
            stmt = stmt.where(Group.group_type == group_type)
        if group_ids:
            stmt = stmt.where(Group.id.in_(list(group_ids)))
        return stmt

    def group_choices(self, *, members: bool = False) -> list[tuple[Any, ...]]:
        """(id, group type, name) of every group, newest first: a picker's choices, without
        reading any call (cheap however many calls the groups hold). With `members`, each
        group's member count is added (from the memberships' index alone)."""
        columns: list[Any] = [Group.id, Group.group_type, Group.name]
        stmt = select(*columns)
        if members:
            counts = (
                select(GroupMember.group_id, func.count(GroupMember.group_id).label("n"))
                .group_by(GroupMember.group_id)
                .subquery()
            )
            stmt = select(*columns, func.coalesce(counts.c.n, 0)).outerjoin(
                counts, counts.c.group_id == Group.id
            )
        stmt = stmt.order_by(Group.created_at.desc(), Group.id.desc())
        return [(int(row[0]), *row[1:]) for row in self.session.execute(stmt)]

    def group_types(self) -> list[str]:
        """The group types present (for a type filter)."""
        return list(
            self.session.scalars(select(Group.group_type).distinct().order_by(Group.group_type))
        )

    def member_count(self, group_id: int, filters: CallFilters = CallFilters()) -> int:
        """How many of the group's calls match `filters` (all of them by default)."""
        stmt = select(func.count(GroupMember.id)).where(GroupMember.group_id == group_id)
        conditions = filters.conditions()
        if conditions:
            stmt = stmt.join(RawCall, RawCall.id == GroupMember.call_id).where(*conditions)
        return int(self.session.scalar(stmt) or 0)

    def group_calls(
        self,
        group_id: int,
        limit: int = 500,
        offset: int = 0,
        filters: CallFilters = CallFilters(),
    ) -> list[tuple[Any, ...]]:
        """Member calls of a group that match `filters`, in position order:
        (position, role, call)."""
        stmt = (
            select(GroupMember.position, GroupMember.role, RawCall)
            .join(RawCall, RawCall.id == GroupMember.call_id)
            .where(GroupMember.group_id == group_id, *filters.conditions())
            .order_by(GroupMember.position, GroupMember.id)
            .limit(limit)
            .offset(offset)
        )
        return [tuple(row) for row in self.session.execute(stmt)]

    # --- embeddings of calls ----------------------------------------------------------
    #
    # A chat call's vector is the stored vector of its text: EmbeddingService records
    # one `embedding` call per distinct text (request_json["input"]) with its vector, so
    # calls are joined to vectors by text, in SQL. When one text was embedded more than
    # once with the model, the newest vector wins.

    @property
    def _postgres(self) -> bool:
        return self.session.get_bind().dialect.name == "postgresql"

    def _string(self, doc: Any, key: str) -> ColumnElement[str]:
        """`doc[key]` when it is a JSON string, else NULL."""
        if self._postgres:
            return case((func.jsonb_typeof(doc[key]) == "string", doc[key].as_string()))
        path = f"$.{key}"
        return case((func.json_type(doc, path) == "text", func.json_extract(doc, path)))

    def _last_user_content(self, request: Any) -> ColumnElement[str]:
        """The content of the request's last user message (NULL when it has none)."""
        if self._postgres:
            messages = request["messages"]
            array = case(
                (func.jsonb_typeof(messages) == "array", messages),
                else_=func.jsonb_build_array(),
            )
            each = (
                func.jsonb_array_elements(array)
                .table_valued(column("value", JSONB), with_ordinality="n")
                .render_derived()
            )
            return (
                select(each.c.value["content"].as_string())
                .where(each.c.value["role"].as_string() == "user")
                .order_by(each.c.n.desc())
                .limit(1)
                .scalar_subquery()
            )
        each = func.json_each(request, "$.messages").table_valued("key", "value", "type").alias()
        message = case((each.c.type == "object", each.c.value))
        return (
            select(func.json_extract(message, "$.content"))
            .where(func.json_extract(message, "$.role") == "user")
            .order_by(each.c.key.desc())
            .limit(1)
            .scalar_subquery()
        )

    def call_text(self, kind: str) -> ColumnElement[str]:
        """SQL for a call's text ('' when it has none): its response text, or its prompt
        (the last user message's content, else the request's `prompt` or `input`)."""
        if kind == "response":
            return func.coalesce(self._string(RawCall.response_json, "text"), "")
        if kind == "prompt":
            return func.coalesce(
                self._last_user_content(RawCall.request_json),
                self._string(RawCall.request_json, "prompt"),
                self._string(RawCall.request_json, "input"),
                "",
            )
        raise ValueError(f"text must be one of {TEXT_KINDS}, got {kind!r}")

    def _stored(self, model: str, provider: str | None) -> Subquery:
        """(text, vector_id): the newest vector of `model` for each embedded text."""
        embed = aliased(RawCall, name="embedding_call")
        embedded = (
            select(
                self._string(embed.request_json, "input").label("text"),
                EmbeddingVector.id.label("vector_id"),
            )
            .select_from(EmbeddingVector)
            .join(embed, embed.id == EmbeddingVector.call_id)
            .where(
                EmbeddingVector.model == model,
                EmbeddingVector.input_index == 0,
                embed.modality == "embedding",
                embed.status == "success",
            )
        )
        if provider:
            embedded = embedded.where(embed.provider == provider)
        inner = embedded.subquery("embedded")
        return (
            select(inner.c.text, func.max(inner.c.vector_id).label("vector_id"))
            .where(inner.c.text.is_not(None))
            .group_by(inner.c.text)
            .subquery("stored")
        )

    def _calls_with_text(
        self, filters: CallFilters, kind: str, group_ids: Sequence[int], *, per_group: bool
    ) -> Select[Any]:
        """Matching non-embedding calls and their text, newest first; with `group_ids`,
        only members of those groups (one row per membership when `per_group`)."""
        columns = [
            RawCall.id.label("call_id"),
            RawCall.provider,
            RawCall.model,
            RawCall.status,
            RawCall.created_at,
            self.call_text(kind).label("text"),
        ]
        conditions = [*filters.conditions(), RawCall.modality != "embedding"]
        if group_ids and per_group:
            stmt = (
                select(GroupMember.group_id, Group.name.label("group"), *columns)
                .join(RawCall, RawCall.id == GroupMember.call_id)
                .join(Group, Group.id == GroupMember.group_id)
                .where(GroupMember.group_id.in_(list(group_ids)), *conditions)
            )
        else:
            group = literal(None, Integer).label("group_id")
            stmt = select(group, literal(None, String).label("group"), *columns).where(*conditions)
            if group_ids:
                members = select(GroupMember.call_id).where(
                    GroupMember.group_id.in_(list(group_ids))
                )
                stmt = stmt.where(RawCall.id.in_(members))
        inner = stmt.subquery("calls")
        return (
            select(inner)
            .where(inner.c.text != "")
            .order_by(inner.c.created_at.desc(), inner.c.call_id.desc(), inner.c.group_id)
        )

    def embedding_rows(
        self,
        filters: CallFilters,
        model: str,
        *,
        group_ids: Sequence[int] = (),
        kind: str = "response",
        provider: str | None = None,
        limit: int | None = None,
    ) -> list[EmbeddingRow]:
        """The newest `limit` matching calls with a non-empty text (one row per chosen
        group they belong to), each with the stored `model` vector of its text or None.
        One query."""
        calls = self._calls_with_text(filters, kind, group_ids, per_group=True)
        if limit is not None:
            calls = calls.limit(limit)
        picked = calls.subquery("picked")
        stored = self._stored(model, provider)
        stmt = (
            select(picked, EmbeddingVector.vector)
            .outerjoin(stored, stored.c.text == picked.c.text)
            .outerjoin(EmbeddingVector, EmbeddingVector.id == stored.c.vector_id)
            .order_by(picked.c.created_at.desc(), picked.c.call_id.desc(), picked.c.group_id)
        )
        return [EmbeddingRow(*row) for row in self.session.execute(stmt)]

    def texts_without_vector(
        self,
        filters: CallFilters,
        model: str,
        *,
        group_ids: Sequence[int] = (),
        kind: str = "response",
        provider: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[int, str]]:
        """(call id, text) of the calls among `embedding_rows`' whose text has no stored
        `model` vector, newest first, each call once. One query."""
        calls = self._calls_with_text(filters, kind, group_ids, per_group=True)
        if limit is not None:
            calls = calls.limit(limit)
        picked = calls.subquery("picked")
        stored = self._stored(model, provider)
        stmt = (
            select(picked.c.call_id, picked.c.text, picked.c.created_at)
            .distinct()
            .outerjoin(stored, stored.c.text == picked.c.text)
            .where(stored.c.vector_id.is_(None))
            .order_by(picked.c.created_at.desc(), picked.c.call_id.desc())
        )
        return [(row.call_id, row.text) for row in self.session.execute(stmt)]

    def _vectors_of_calls(
        self,
        filters: CallFilters,
        model: str,
        dimension: int,
        *,
        group_ids: Sequence[int],
        kind: str,
        provider: str | None,
        exclude: int | None,
    ) -> tuple[Subquery, Select[Any]]:
        """The matching calls that have a usable stored vector of `dimension`."""
        calls = self._calls_with_text(filters, kind, group_ids, per_group=False)
        calls = calls.order_by(None).subquery()
        stored = self._stored(model, provider)
        stmt = (
            select(calls.c.call_id)
            .join(stored, stored.c.text == calls.c.text)
            .join(EmbeddingVector, EmbeddingVector.id == stored.c.vector_id)
            .where(EmbeddingVector.dimension == dimension, EmbeddingVector.norm > 0)
        )
        if exclude is not None:
            stmt = stmt.where(calls.c.call_id != exclude)
        return calls, stmt

    def candidate_vectors(
        self,
        filters: CallFilters,
        model: str,
        dimension: int,
        *,
        group_ids: Sequence[int] = (),
        kind: str = "response",
        provider: str | None = None,
        exclude: int | None = None,
    ) -> list[tuple[int, list[float]]]:
        """(call id, vector) of every matching call whose text has a non-zero stored
        `model` vector of `dimension`, except `exclude`. One query, ids and vectors only."""
        _calls, stmt = self._vectors_of_calls(
            filters,
            model,
            dimension,
            group_ids=group_ids,
            kind=kind,
            provider=provider,
            exclude=exclude,
        )
        stmt = stmt.add_columns(EmbeddingVector.vector).order_by(stmt.selected_columns[0])
        return [(int(call_id), vector) for call_id, vector in self.session.execute(stmt)]

    def has_pgvector(self) -> bool:
        """Whether `embedding_vectors` has the generated pgvector column (PostgreSQL with
        the extension)."""
        if not self._postgres:
            return False
        found = self.session.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'embedding_vectors' "
                "AND column_name = 'embedding' AND udt_name = 'vector')"
            )
        )
        return bool(found)

    def nearest_pgvector(
        self,
        filters: CallFilters,
        model: str,
        query: Sequence[float],
        k: int,
        *,
        group_ids: Sequence[int] = (),
        kind: str = "response",
        provider: str | None = None,
        exclude: int | None = None,
    ) -> list[tuple[int, float]]:
        """(call id, cosine similarity) of the `k` matching calls nearest to `query`,
        ordered by pgvector's cosine distance in the database. Needs `has_pgvector()`."""
        _calls, stmt = self._vectors_of_calls(
            filters,
            model,
            len(query),
            group_ids=group_ids,
            kind=kind,
            provider=provider,
            exclude=exclude,
        )
        target = cast(literal(str([float(x) for x in query]), String), _PgVector())
        distance = literal_column("embedding_vectors.embedding", _PgVector()).op(
            "<=>", return_type=Float
        )(target)
        stmt = stmt.add_columns((1 - distance).label("similarity")).order_by(
            distance, stmt.selected_columns[0]
        )
        return [(int(i), float(score)) for i, score in self.session.execute(stmt.limit(k))]

    def vector_of_call(
        self, call_id: int, model: str, *, kind: str = "response", provider: str | None = None
    ) -> list[float] | None:
        """The stored `model` vector of the call's text, or None. One query."""
        stored = self._stored(model, provider)
        stmt = (
            select(EmbeddingVector.vector)
            .select_from(RawCall)
            .join(stored, stored.c.text == self.call_text(kind))
            .join(EmbeddingVector, EmbeddingVector.id == stored.c.vector_id)
            .where(RawCall.id == call_id)
        )
        return self.session.scalar(stmt)

    def call_texts(
        self, call_ids: Sequence[int], *, kind: str = "response", group_ids: Sequence[int] = ()
    ) -> dict[int, CallText]:
        """Each call's provider, model, status, time and text, with the names of the
        groups among `group_ids` it belongs to. One query."""
        if not call_ids:
            return {}
        stmt = (
            select(
                RawCall.id,
                RawCall.provider,
                RawCall.model,
                RawCall.status,
                RawCall.created_at,
                self.call_text(kind),
                Group.name,
            )
            .outerjoin(
                GroupMember,
                and_(
                    GroupMember.call_id == RawCall.id,
                    GroupMember.group_id.in_(list(group_ids)),
                ),
            )
            .outerjoin(Group, Group.id == GroupMember.group_id)
            .where(RawCall.id.in_(list(call_ids)))
            .order_by(RawCall.id, Group.name)
        )
        found: dict[int, CallText] = {}
        for call_id, provider, model, status, created_at, call_text, group in self.session.execute(
            stmt
        ):
            known = found.get(call_id)
            groups = (known.groups if known else ()) + ((group,) if group is not None else ())
            found[call_id] = CallText(
                call_id, provider, model, status, created_at, call_text, groups
            )
        return found
