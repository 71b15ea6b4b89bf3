"""StudyService: the record as pandas frames for charts, tables, search and embedding maps.

Every number is computed by the database over all matching rows (never a LIMITed sample);
the only samples are the latency points for box plots and the rows of paged tables, and
they say so. Every method takes the same `CallFilters`. Methods are synchronous (they do
database work): a UI runs them off its event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from ..db.connection import UnitOfWork
from ..db.filters import CallFilters
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
            rows = [
                {
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
                        response_text(call.response_json)
                        or str((call.error_json or {}).get("message", ""))
                    ),
                }
                for call in page.rows
            ]
            token = page.next_cursor.encode() if page.next_cursor else None
            return CallsPage(pd.DataFrame(rows, columns=_CALL_COLUMNS), token)

        return self._read(read)

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

    def groups(self, group_type: str | None = None) -> pd.DataFrame:
        """Groups with member counts and statistics (failure rate, tokens, cost, latency)."""
        rows = self._read(
            lambda uow: [vars(g) for g in StudyQueries(uow.session).group_stats(group_type)]
        )
        frame = pd.DataFrame(
            rows,
            columns=[
                "id",
                "group_type",
                "name",
                "description",
                "created_at",
                "members",
                "calls",
                "failures",
                "total_tokens",
                "cost_usd",
                "latency_mean_ms",
            ],
        )
        frame["failure_rate"] = [
            (f / c) if c else None for f, c in zip(frame["failures"], frame["calls"], strict=True)
        ]
        return frame

    def group_calls(self, group_id: int, limit: int = 500) -> pd.DataFrame:
        """A group's calls in position order."""

        def read(uow: UnitOfWork) -> list[dict[str, Any]]:
            return [
                {
                    "position": position,
                    "role": role,
                    "id": call.id,
                    "provider": call.provider,
                    "model": call.model,
                    "status": call.status,
                    "latency_ms": call.latency_ms,
                    "total_tokens": call.total_tokens,
                    "prompt": _preview(prompt_text(call.request_json)),
                    "response": _preview(response_text(call.response_json)),
                }
                for position, role, call in StudyQueries(uow.session).group_calls(group_id, limit)
            ]

        return pd.DataFrame(
            self._read(read),
            columns=[
                "position",
                "role",
                *_CALL_COLUMNS[:1],
                *_CALL_COLUMNS[2:5],
                "latency_ms",
                "total_tokens",
                "prompt",
                "response",
            ],
        )

    def compare_groups(self, group_ids: Sequence[int]) -> pd.DataFrame:
        """Side by side: one row per group with the same aggregates as `summary`."""
        rows = []
        names = {g["id"]: g["name"] for g in self.groups().to_dict("records")}
        for group_id in group_ids:
            stats = self.summary(CallFilters(group_id=group_id))
            rows.append(
                {"group_id": group_id, "group": names.get(group_id, str(group_id)), **stats}
            )
        return pd.DataFrame(rows)

    def batch_matrix(self, group_id: int) -> pd.DataFrame:
        """Prompts × targets: the final answer of each (first sample), for a batch group."""
        frame = self.group_calls(group_id, limit=100_000)
        if frame.empty:
            return frame
        final = frame[frame["role"].isin(["final", None]) | frame["role"].isna()].copy()
        final["target"] = final["provider"] + " / " + final["model"]
        final["answer"] = [
            r if s == "success" else f"({s})"
            for r, s in zip(final["response"], final["status"], strict=True)
        ]
        return final.pivot_table(
            index="prompt", columns="target", values="answer", aggfunc="first"
        ).reset_index()

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
