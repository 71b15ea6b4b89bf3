"""StudyService: the record as pandas frames for charts, tables, search and embedding maps.

Every number is computed by the database over all matching rows (never a LIMITed sample);
the only samples are the latency points for box plots and the rows of paged tables, and
they say so. Every method takes the same `CallFilters`. Methods are synchronous (they do
database work): a UI runs them off its event loop.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from ..db import rollups
from ..db.aggregates import CallStats
from ..db.connection import UnitOfWork
from ..db.filters import CallFilters
from ..db.models_v2 import RawCall
from ..db.repositories.study import TEXT_KINDS, StudyQueries

PREVIEW_CHARS = 160
MAP_LIMIT = 5000  # calls on one embedding map, newest first
PROJECTIONS = ("pca", "umap")
STAT_COLUMNS = [
    "count",
    "successes",
    "failures",
    "failure_rate",
    "prompt_tokens_sum",
    "completion_tokens_sum",
    "total_tokens_sum",
    "prompt_tokens_mean",
    "completion_tokens_mean",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "cost_usd_sum",
]


def prompt_text(request: dict[str, Any] | None) -> str:
    """The user-visible prompt of a request: its last user message (or prompt / input)."""
    request = request or {}
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content", ""))
    for key in ("prompt", "input"):
        if isinstance(request.get(key), str):
            return request[key]
    return ""


def response_text(response: dict[str, Any] | None) -> str:
    return str((response or {}).get("text", "")) if response else ""


def _preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class CallsPage:
    """One page of calls and the token of the next page (None at the end)."""

    frame: pd.DataFrame
    next_cursor: str | None


def summary_row(stats: CallStats, providers: int, models: int) -> dict[str, Any]:
    """The summary cards' numbers: `stats` over the matching calls, and how many distinct
    providers and (provider, model) pairs they came from."""
    return {
        "calls": stats.count,
        "successes": stats.successes,
        "failures": stats.failures,
        "failure_rate": stats.failure_rate,
        "prompt_tokens": stats.prompt_tokens_sum,
        "completion_tokens": stats.completion_tokens_sum,
        "total_tokens": stats.total_tokens_sum,
        "cost_usd": stats.cost_usd_sum,
        "latency_mean_ms": stats.latency_mean_ms,
        "latency_p50_ms": stats.latency_p50_ms,
        "latency_p90_ms": stats.latency_p90_ms,
        "latency_p99_ms": stats.latency_p99_ms,
        "providers": providers,
        "models": models,
    }


class StudyService:
    """Read-side service for the dashboard and notebooks."""

    def __init__(
        self, engine: Engine, *, prepare: Callable[[StudyService], object] | None = None
    ) -> None:
        """`prepare(service)` runs once per database per process, in the background after
        the Analytics aggregates' cache is read: a dashboard asks for its default view
        there, so that the answers are ready when the first visitor opens it."""
        self.engine = engine
        self._pgvector: bool | None = None  # does embedding_vectors have a pgvector column?
        rollups.warm_up(engine, then=None if prepare is None else lambda: prepare(self))

    def _read(self, fn: Callable[[UnitOfWork], Any]) -> Any:
        with UnitOfWork(self.engine) as uow:
            return fn(uow)

    # --- overview ------------------------------------------------------------------------

    def summary(self, filters: CallFilters = CallFilters()) -> dict[str, Any]:
        """Totals over every matching call."""

        def read(uow: UnitOfWork) -> dict[str, Any]:
            stats = uow.calls.summary(filters)
            providers, models = StudyQueries(uow.session).distinct_counts(filters)
            return summary_row(stats, providers, models)

        return self._read(read)

    def facets(self, filters: CallFilters = CallFilters()) -> dict[str, list[str]]:
        """Providers and models of the matching calls (all calls by default), for filter
        widgets."""
        return self._read(lambda uow: StudyQueries(uow.session).facets(filters))

    def compare(self, filters: CallFilters = CallFilters()) -> pd.DataFrame:
        """One row per (provider, model): counts, failure rate, latency percentiles, cost."""
        frame = self._read(lambda uow: uow.calls.stats_frame(filters, ("provider", "model")))
        frame = frame[["provider", "model", *STAT_COLUMNS]].reset_index(drop=True)
        frame.insert(2, "target", frame["provider"] + " / " + frame["model"])
        return frame

    def time_series(
        self,
        filters: CallFilters = CallFilters(),
        bucket: str = "hour",
        by: str | None = "provider",
    ) -> pd.DataFrame:
        """One row per time bucket (and provider or model): calls, failures, latency, cost."""
        if by not in ("provider", "model", None):
            raise ValueError(f"by must be 'provider', 'model' or None, got {by!r}")
        keys = ("bucket", by) if by else ("bucket",)
        columns = ["bucket", *([by] if by else []), *STAT_COLUMNS]
        frame = self._read(lambda uow: uow.calls.stats_frame(filters, keys, bucket))  # type: ignore[arg-type]
        if frame.empty:
            return pd.DataFrame(columns=columns)
        frame = frame[columns].reset_index(drop=True)
        frame["bucket"] = pd.to_datetime(frame["bucket"], utc=True)
        return frame

    def latency_samples(
        self, filters: CallFilters = CallFilters(), per_model: int = 2000
    ) -> pd.DataFrame:
        """Newest successful latencies per provider/model (a sample, for box/violin plots)."""
        rows = self._read(lambda uow: StudyQueries(uow.session).latency_samples(filters, per_model))
        frame = pd.DataFrame(rows, columns=["provider", "model", "latency_ms"])
        frame["target"] = frame["provider"] + " / " + frame["model"]
        return frame

    # --- calls ---------------------------------------------------------------------------

    def recent_calls(
        self,
        filters: CallFilters = CallFilters(),
        limit: int = 50,
        after: str | None = None,
    ) -> CallsPage:
        """A page of calls, newest first (keyset pagination: pass `next_cursor` as `after`)."""

        def read(uow: UnitOfWork) -> CallsPage:
            page = uow.calls.query(filters, limit=limit, after=after)
            rows = [_call_row(call) for call in page.rows]
            token = page.next_cursor.encode() if page.next_cursor else None
            return CallsPage(pd.DataFrame(rows, columns=_CALL_COLUMNS), token)

        return self._read(read)

    def calls_table(
        self, filters: CallFilters = CallFilters(), max_rows: int = 100_000
    ) -> pd.DataFrame:
        """Every matching call (newest first, at most `max_rows`) as `recent_calls` rows."""
        frames, after, left = [], None, max_rows
        while left > 0:
            page = self.recent_calls(filters, limit=min(left, 5_000), after=after)
            frames.append(page.frame)
            left -= len(page.frame)
            after = page.next_cursor
            if after is None:
                break
        return (
            pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_CALL_COLUMNS)
        )

    def count(self, filters: CallFilters = CallFilters()) -> int:
        return self._read(lambda uow: uow.calls.count(filters))

    def call(self, call_id: int) -> dict[str, Any] | None:
        """The full record of one call (request, response, error, metadata, groups)."""

        def read(uow: UnitOfWork) -> dict[str, Any] | None:
            call = uow.calls.get(call_id)
            if call is None:
                return None
            record = call.to_dict()
            record["prompt"] = prompt_text(call.request_json)
            record["response"] = response_text(call.response_json)
            record["groups"] = [
                {"id": g.id, "type": g.group_type, "name": g.name}
                for g in uow.groups.groups_of_call(call_id)
            ]
            return record

        return self._read(read)

    def search(
        self, text: str, filters: CallFilters = CallFilters(), limit: int = 100
    ) -> pd.DataFrame:
        """Ranked full-text hits with `[[marked]]` snippets of prompt and response."""
        hits = self._read(lambda uow: [h.as_dict() for h in uow.calls.search(text, filters, limit)])
        return pd.DataFrame(
            hits,
            columns=[
                "call_id",
                "rank",
                "prompt_snippet",
                "response_snippet",
                "provider",
                "model",
                "status",
                "created_at",
            ],
        )

    # --- groups --------------------------------------------------------------------------

    def groups(
        self,
        group_type: str | None = None,
        filters: CallFilters | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> pd.DataFrame:
        """Groups (newest first) with member counts and statistics of their calls.

        `members` counts every member; `calls`, `failures`, `failure_rate`, tokens, cost
        and latency cover the member calls that match `filters` (all when None). With
        `filters.group_id` set, only that group is listed. `limit`/`offset` give one page
        of the groups (its statistics alone are computed); `group_count` says how many
        there are in all.
        """
        filters, group_ids = _group_filter(filters)
        rows = self._read(
            lambda uow: [
                vars(g)
                for g in StudyQueries(uow.session).group_stats(
                    group_type, group_ids, filters, limit=limit, offset=offset
                )
            ]
        )
        return pd.DataFrame(rows, columns=_GROUP_COLUMNS)

    def group_count(self, group_type: str | None = None, filters: CallFilters | None = None) -> int:
        """How many groups `groups` lists for this type and filters (for paging)."""
        _, group_ids = _group_filter(filters)
        return self._read(lambda uow: StudyQueries(uow.session).group_count(group_type, group_ids))

    def group_choices(self, *, members: bool = False) -> pd.DataFrame:
        """Every group's id, type and name, newest first, and with `members` its member
        count (for a group picker; no statistics of the calls, so it stays fast with
        millions of members)."""
        rows = self._read(lambda uow: StudyQueries(uow.session).group_choices(members=members))
        return pd.DataFrame(
            rows, columns=["id", "group_type", "name", *(["members"] if members else [])]
        )

    def group_types(self) -> list[str]:
        """The group types present in the record (for a type filter)."""
        return self._read(lambda uow: StudyQueries(uow.session).group_types())

    def group_size(self, group_id: int, filters: CallFilters = CallFilters()) -> int:
        """How many of the group's calls match `filters` (all of them by default)."""
        return self._read(lambda uow: StudyQueries(uow.session).member_count(group_id, filters))

    def group_calls(
        self,
        group_id: int,
        limit: int = 500,
        offset: int = 0,
        filters: CallFilters = CallFilters(),
    ) -> pd.DataFrame:
        """The group's calls that match `filters`, in position order (`limit` rows from
        `offset`)."""

        def read(uow: UnitOfWork) -> list[dict[str, Any]]:
            return [
                {"position": position, "role": role, **_call_row(call)}
                for position, role, call in StudyQueries(uow.session).group_calls(
                    group_id, limit, offset, filters
                )
            ]

        return pd.DataFrame(self._read(read), columns=["position", "role", *_CALL_COLUMNS])

    def compare_groups(
        self, group_ids: Sequence[int], filters: CallFilters = CallFilters()
    ) -> pd.DataFrame:
        """Side by side: one row per group (in the order given) with `summary`'s aggregates.

        `filters` narrow each group's calls (its own `group_id` is replaced by the group's).
        Unknown ids are left out.
        """
        ids = list(dict.fromkeys(int(g) for g in group_ids))

        def read(uow: UnitOfWork) -> list[dict[str, Any]]:
            known = {g.id: g for g in StudyQueries(uow.session).group_stats(group_ids=ids)}
            return [
                {"group_id": g, "group_type": known[g].group_type, "group": known[g].name}
                for g in ids
                if g in known
            ]

        rows = [
            {**row, **self.summary(replace(filters, group_id=row["group_id"]))}
            for row in self._read(read)
        ]
        return pd.DataFrame(rows, columns=["group_id", "group_type", "group", *_SUMMARY_KEYS])

    def batch_matrix(self, group_id: int, filters: CallFilters = CallFilters()) -> pd.DataFrame:
        """Prompts × targets for a batch group: the final answer of each pair's first sample.

        One row per distinct prompt (full text, in the order the batch sent them), one
        column per "provider / model". Retried and superseded attempts are left out; a
        failed final attempt shows as "(failed)" (or its other status). Only calls that
        match `filters` take part.
        """

        def read(uow: UnitOfWork) -> list[tuple[str, str, str]]:
            out = []
            for _position, role, call in StudyQueries(uow.session).group_calls(
                group_id, limit=1_000_000, filters=filters
            ):
                if role not in (None, "final"):
                    continue
                answer = (
                    response_text(call.response_json)
                    if call.status == "success"
                    else f"({call.status})"
                )
                out.append(
                    (prompt_text(call.request_json), f"{call.provider} / {call.model}", answer)
                )
            return out

        rows = self._read(read)
        if not rows:
            return pd.DataFrame(columns=["prompt"])
        frame = pd.DataFrame(rows, columns=["prompt", "target", "answer"])
        first = frame.drop_duplicates(["prompt", "target"], keep="first")
        matrix = first.pivot(index="prompt", columns="target", values="answer")
        prompts = list(dict.fromkeys(frame["prompt"]))
        targets = list(dict.fromkeys(frame["target"]))
        matrix = matrix.reindex(index=prompts, columns=targets).reset_index()
        matrix.columns.name = None
        return matrix

    # --- embeddings ----------------------------------------------------------------------

    def embedding_map(
        self,
        filters: CallFilters,
        model: str,
        method: str = "pca",
        *,
        groups: Sequence[int] = (),
        text: str = "response",
        provider: str | None = None,
        limit: int | None = MAP_LIMIT,
        vectors: Mapping[int, Sequence[float]] | None = None,
    ) -> pd.DataFrame:
        """The matching calls' stored `model` vectors projected to 2-D (`method` "pca" or
        "umap"), read in one query.

        The calls are the newest `limit` matching chat/completion calls whose `text`
        ("response" or "prompt") is not empty, and, with `groups` (else with
        `filters.group_id`), members of those groups: one row per group a call belongs
        to. A call's vector is the stored vector of its text (EmbeddingService stores one
        per distinct text; the newest wins, and only `provider`'s when given); `vectors`
        supplies vectors for calls that have none stored. Columns: call_id, x, y,
        group_id, group, provider, model, status, created_at, text, preview.
        `frame.attrs["missing"]` counts the calls left out for want of a vector and
        `frame.attrs["truncated"]` says whether `limit` cut the list.
        """
        _check_method(method)
        kind = _check_text(text)
        model = _check_model(model)
        group_ids = _group_ids(groups, filters)
        fetch = None if limit is None else limit + 1
        rows = self._read(
            lambda uow: StudyQueries(uow.session).embedding_rows(
                filters, model, group_ids=group_ids, kind=kind, provider=provider, limit=fetch
            )
        )
        truncated = limit is not None and len(rows) > limit
        rows = rows[:limit] if limit is not None else rows
        extra = vectors or {}
        kept, missing = [], set()
        for row in rows:
            vector = row.vector if row.vector is not None else extra.get(row.call_id)
            if vector is None:
                missing.add(row.call_id)
            else:
                kept.append((row, [float(x) for x in vector]))
        first: dict[int, list[float]] = {}
        for row, vector in kept:
            first.setdefault(row.call_id, vector)
        lengths = sorted({len(v) for v in first.values()})
        if len(lengths) > 1:
            raise ValueError(
                f"the {model} vectors of these calls have different lengths "
                f"({', '.join(map(str, lengths))}): embed them again with one setting"
            )
        coords = dict(zip(first, self.project(list(first.values()), method), strict=True))
        frame = pd.DataFrame(
            [
                {
                    "call_id": row.call_id,
                    "x": coords[row.call_id][0],
                    "y": coords[row.call_id][1],
                    "group_id": row.group_id,
                    "group": row.group,
                    "provider": row.provider,
                    "model": row.model,
                    "status": row.status,
                    "created_at": row.created_at,
                    "text": row.text,
                    "preview": _preview(row.text),
                }
                for row, _vector in kept
            ],
            columns=_MAP_COLUMNS,
        )
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        frame["group_id"] = frame["group_id"].astype("Int64")
        frame.attrs.update(missing=len(missing), truncated=truncated, method=method)
        return frame

    def missing_embeddings(
        self,
        filters: CallFilters,
        model: str,
        *,
        groups: Sequence[int] = (),
        text: str = "response",
        provider: str | None = None,
        limit: int | None = MAP_LIMIT,
    ) -> pd.DataFrame:
        """The calls `embedding_map` would show (same arguments) whose text has no stored
        `model` vector yet: call_id and the text to embed, newest first, each call once.
        One query."""
        kind = _check_text(text)
        model = _check_model(model)
        group_ids = _group_ids(groups, filters)
        rows = self._read(
            lambda uow: StudyQueries(uow.session).texts_without_vector(
                filters, model, group_ids=group_ids, kind=kind, provider=provider, limit=limit
            )
        )
        return pd.DataFrame(rows, columns=["call_id", "text"])

    def neighbours(
        self,
        filters: CallFilters,
        model: str,
        *,
        vector: Sequence[float] | None = None,
        call_id: int | None = None,
        k: int = 10,
        groups: Sequence[int] = (),
        text: str = "response",
        provider: str | None = None,
    ) -> pd.DataFrame:
        """The `k` matching calls whose stored `model` vectors are nearest (cosine) to
        `vector`, or to the stored vector of call `call_id` (never its own neighbour).

        Candidates are the calls `embedding_map` would use, without its limit. On
        PostgreSQL with pgvector the database orders them; elsewhere one query fetches
        ids and vectors and numpy ranks them. Columns: rank, call_id, similarity, group
        (the chosen groups it is in), provider, model, status, created_at, text, preview.
        """
        if (vector is None) == (call_id is None):
            raise ValueError("give either a vector or a call id to find neighbours of")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        kind = _check_text(text)
        model = _check_model(model)
        group_ids = _group_ids(groups, filters)

        def read(uow: UnitOfWork) -> list[dict[str, Any]]:
            queries = StudyQueries(uow.session)
            query = vector
            if call_id is not None:
                query = queries.vector_of_call(call_id, model, kind=kind, provider=provider)
                if query is None:
                    raise LookupError(f"call {call_id} has no stored {model} embedding")
            query = _check_vector(query)
            where = {
                "group_ids": group_ids,
                "kind": kind,
                "provider": provider,
                "exclude": call_id,
            }
            if self._has_pgvector(queries):
                hits = queries.nearest_pgvector(filters, model, query, k, **where)
            else:
                candidates = queries.candidate_vectors(filters, model, len(query), **where)
                ranked = self.nearest(query, [v for _, v in candidates], k)
                hits = [(candidates[i][0], score) for i, score in ranked]
            details = queries.call_texts([i for i, _ in hits], kind=kind, group_ids=group_ids)
            return [
                {
                    "rank": rank,
                    "call_id": hit,
                    "similarity": score,
                    "group": ", ".join(details[hit].groups) or None,
                    "provider": details[hit].provider,
                    "model": details[hit].model,
                    "status": details[hit].status,
                    "created_at": details[hit].created_at,
                    "text": details[hit].text,
                    "preview": _preview(details[hit].text),
                }
                for rank, (hit, score) in enumerate(hits, start=1)
            ]

        frame = pd.DataFrame(self._read(read), columns=_NEIGHBOUR_COLUMNS)
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        return frame

    def _has_pgvector(self, queries: StudyQueries) -> bool:
        if self._pgvector is None:
            self._pgvector = queries.has_pgvector()
        return self._pgvector

    @staticmethod
    def project(
        vectors: Sequence[Sequence[float]], method: str = "pca"
    ) -> list[tuple[float, float]]:
        """2-D coordinates for vectors (PCA via scikit-learn; UMAP when installed and asked)."""
        import numpy as np

        _check_method(method)
        data = np.asarray(vectors, dtype=float)
        if len(data) == 0:
            return []
        if len(data) == 1:
            return [(0.0, 0.0)]
        if method == "umap":
            import umap  # type: ignore[import-not-found]

            neighbours = max(2, min(15, len(data) - 1))
            coords = umap.UMAP(
                n_components=2, n_neighbors=neighbours, random_state=0
            ).fit_transform(data)
        else:
            from sklearn.decomposition import PCA

            components = min(2, data.shape[0], data.shape[1])
            coords = PCA(n_components=components, random_state=0).fit_transform(data)
            if coords.shape[1] == 1:
                coords = np.hstack([coords, np.zeros((len(coords), 1))])
        return [(float(x), float(y)) for x, y in coords]

    @staticmethod
    def nearest(
        query: Sequence[float], candidates: Sequence[Sequence[float]], k: int = 10
    ) -> list[tuple[int, float]]:
        """Indices of the `k` candidates most similar to `query` (cosine), best first
        (ties in candidate order). Zero vectors have no similarity and are left out."""
        import numpy as np

        if not len(candidates):
            return []
        matrix = np.asarray(candidates, dtype=float)
        q = np.asarray(query, dtype=float)
        norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(q)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = np.where(norms == 0, np.nan, matrix @ q / norms)
        order = [i for i in np.argsort(-scores, kind="stable") if not math.isnan(scores[i])]
        return [(int(i), float(scores[i])) for i in order[:k]]


def _check_method(method: str) -> None:
    if method not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {method!r}")
    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise ValueError("UMAP needs the umap-learn package (pip install umap-learn); use PCA")


def _check_text(text: str) -> str:
    if text not in TEXT_KINDS:
        raise ValueError(f"text must be one of {TEXT_KINDS}, got {text!r}")
    return text


def _check_model(model: str) -> str:
    model = (model or "").strip()
    if not model:
        raise ValueError("choose an embedding model")
    return model


def _check_vector(vector: Sequence[float]) -> list[float]:
    values = [float(x) for x in vector]
    if not values:
        raise ValueError("the vector to compare with is empty")
    if not all(math.isfinite(x) for x in values):
        raise ValueError("the vector to compare with contains NaN or infinity")
    if not any(values):
        raise ValueError("the vector to compare with is all zeros")
    return values


def _group_ids(groups: Sequence[int], filters: CallFilters) -> tuple[int, ...]:
    """The groups whose members to show: those asked for, else the filters' group."""
    if groups:
        return tuple(dict.fromkeys(int(g) for g in groups))
    return () if filters.group_id is None else (filters.group_id,)


def _call_row(call: RawCall) -> dict[str, Any]:
    """One table row for a call: its numbers and previews of prompt and answer (or error)."""
    return {
        "id": call.id,
        "created_at": call.created_at,
        "provider": call.provider,
        "model": call.model,
        "status": call.status,
        "latency_ms": call.latency_ms,
        "total_tokens": call.total_tokens,
        "cost_usd": call.cost_usd,
        "prompt": _preview(prompt_text(call.request_json)),
        "response": _preview(
            response_text(call.response_json) or str((call.error_json or {}).get("message", ""))
        ),
    }


_SUMMARY_KEYS = [
    "calls",
    "successes",
    "failures",
    "failure_rate",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "providers",
    "models",
]
_GROUP_COLUMNS = [
    "id",
    "group_type",
    "name",
    "description",
    "created_at",
    "members",
    "calls",
    "failures",
    "failure_rate",
    "total_tokens",
    "cost_usd",
    "latency_mean_ms",
]
_CALL_COLUMNS = [
    "id",
    "created_at",
    "provider",
    "model",
    "status",
    "latency_ms",
    "total_tokens",
    "cost_usd",
    "prompt",
    "response",
]
_MAP_COLUMNS = [
    "call_id",
    "x",
    "y",
    "group_id",
    "group",
    "provider",
    "model",
    "status",
    "created_at",
    "text",
    "preview",
]
_NEIGHBOUR_COLUMNS = [
    "rank",
    "call_id",
    "similarity",
    "group",
    "provider",
    "model",
    "status",
    "created_at",
    "text",
    "preview",
]


def _group_filter(filters: CallFilters | None) -> tuple[CallFilters | None, tuple[int, ...]]:
    """(the filters of the member calls, the group ids to list): a `group_id` filter
    narrows the list of groups rather than their calls."""
    if filters is not None and filters.group_id is not None:
        return replace(filters, group_id=None), (filters.group_id,)
    return filters, ()
