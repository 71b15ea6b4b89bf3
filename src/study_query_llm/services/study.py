"""StudyService: the record as pandas frames for charts, tables, search and embedding maps.

Every number is computed by the database over all matching rows (never a LIMITed sample);
the only samples are the latency points for box plots and the rows of paged tables, and
they say so. Every method takes the same `CallFilters`. Methods are synchronous (they do
database work): a UI runs them off its event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from ..db.connection import UnitOfWork
from ..db.filters import CallFilters
from ..db.models_v2 import RawCall
from ..db.repositories.study import StudyQueries

PREVIEW_CHARS = 160
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


class StudyService:
    """Read-side service for the dashboard and notebooks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _read(self, fn: Callable[[UnitOfWork], Any]) -> Any:
        with UnitOfWork(self.engine) as uow:
            return fn(uow)

    # --- overview ------------------------------------------------------------------------

    def summary(self, filters: CallFilters = CallFilters()) -> dict[str, Any]:
        """Totals over every matching call."""

        def read(uow: UnitOfWork) -> dict[str, Any]:
            stats = uow.calls.summary(filters)
            providers, models = StudyQueries(uow.session).distinct_counts(filters)
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

        return self._read(read)

    def facets(self) -> dict[str, list[str]]:
        """Providers and models present in the record, for filter widgets."""
        return self._read(lambda uow: StudyQueries(uow.session).facets())

    def compare(self, filters: CallFilters = CallFilters()) -> pd.DataFrame:
        """One row per (provider, model): counts, failure rate, latency percentiles, cost."""
        rows = self._read(lambda uow: [s.as_dict() for s in uow.calls.by_provider_model(filters)])
        frame = pd.DataFrame(rows, columns=["provider", "model", *STAT_COLUMNS])
        frame.insert(2, "target", frame["provider"] + " / " + frame["model"])
        return frame

    def time_series(
        self,
        filters: CallFilters = CallFilters(),
        bucket: str = "hour",
        by: str | None = "provider",
    ) -> pd.DataFrame:
        """One row per time bucket (and provider or model): calls, failures, latency, cost."""
        rows = self._read(
            lambda uow: [s.as_dict() for s in uow.calls.time_buckets(filters, bucket, by)]
        )
        columns = ["bucket", *([by] if by else []), *STAT_COLUMNS]
        frame = pd.DataFrame(rows)
        if frame.empty:
            return pd.DataFrame(columns=columns)
        frame = frame[columns]
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
        self, group_type: str | None = None, filters: CallFilters | None = None
    ) -> pd.DataFrame:
        """Groups (newest first) with member counts and statistics of their calls.

        `members` counts every member; `calls`, `failures`, `failure_rate`, tokens, cost
        and latency cover the member calls that match `filters` (all when None). With
        `filters.group_id` set, only that group is listed.
        """
        group_ids: tuple[int, ...] = ()
        if filters is not None and filters.group_id is not None:
            group_ids = (filters.group_id,)
            filters = replace(filters, group_id=None)
        rows = self._read(
            lambda uow: [
                vars(g)
                for g in StudyQueries(uow.session).group_stats(group_type, group_ids, filters)
            ]
        )
        return pd.DataFrame(rows, columns=_GROUP_COLUMNS)

    def group_types(self) -> list[str]:
        """The group types present in the record (for a type filter)."""
        return self._read(lambda uow: StudyQueries(uow.session).group_types())

    def group_size(self, group_id: int) -> int:
        """How many calls the group has."""
        return self._read(lambda uow: StudyQueries(uow.session).member_count(group_id))

    def group_calls(self, group_id: int, limit: int = 500, offset: int = 0) -> pd.DataFrame:
        """A group's calls in position order (`limit` rows from `offset`)."""

        def read(uow: UnitOfWork) -> list[dict[str, Any]]:
            return [
                {"position": position, "role": role, **_call_row(call)}
                for position, role, call in StudyQueries(uow.session).group_calls(
                    group_id, limit, offset
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

    def batch_matrix(self, group_id: int) -> pd.DataFrame:
        """Prompts × targets for a batch group: the final answer of each pair's first sample.

        One row per distinct prompt (full text, in the order the batch sent them), one
        column per "provider / model". Retried and superseded attempts are left out; a
        failed final attempt shows as "(failed)" (or its other status).
        """

        def read(uow: UnitOfWork) -> list[tuple[str, str, str]]:
            out = []
            for _position, role, call in StudyQueries(uow.session).group_calls(
                group_id, limit=1_000_000
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

    @staticmethod
    def project(
        vectors: Sequence[Sequence[float]], method: str = "pca"
    ) -> list[tuple[float, float]]:
        """2-D coordinates for vectors (PCA via scikit-learn; UMAP when installed and asked)."""
        import numpy as np

        data = np.asarray(vectors, dtype=float)
        if len(data) == 0:
            return []
        if len(data) == 1:
            return [(0.0, 0.0)]
        if method == "umap":
            try:
                import umap  # type: ignore[import-not-found]
            except ImportError as exc:
                raise ValueError(
                    "UMAP is not installed; use PCA or pip install umap-learn"
                ) from exc
            coords = umap.UMAP(n_components=2, random_state=0).fit_transform(data)
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
        """Indices of the `k` candidates most similar to `query` (cosine), best first."""
        import numpy as np

        if not len(candidates):
            return []
        matrix = np.asarray(candidates, dtype=float)
        q = np.asarray(query, dtype=float)
        norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(q) or 1.0)
        scores = matrix @ q / np.where(norms == 0, 1.0, norms)
        order = np.argsort(-scores)[:k]
        return [(int(i), float(scores[i])) for i in order if not math.isnan(scores[i])]


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
