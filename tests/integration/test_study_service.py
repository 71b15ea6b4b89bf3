"""StudyService (and GroupService) on SQLite and PostgreSQL, checked against pandas.

One varied record is inserted per test (several providers and models, every status,
missing latencies and tokens, calls spread over minutes, hours, days and weeks, a batch
group with retries, labels and an empty group). Every frame the service returns is
compared with the same numbers computed by pandas over the same rows; embedding maps and
neighbours (responses embedded through EmbeddingService with the mock provider) are
compared with scikit-learn's PCA and a numpy cosine ranking over the same vectors.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA
from sqlalchemy import Engine, event, select

from study_query_llm.config import Settings
from study_query_llm.db.connection import UnitOfWork, get_engine
from study_query_llm.db.errors import GroupExistsError, InvalidSearchError
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import RawCall
from study_query_llm.db.records import NewCall
from study_query_llm.db.repositories.study import StudyQueries
from study_query_llm.providers import create
from study_query_llm.services.embedding import EmbeddingService
from study_query_llm.services.groups import GroupService, parse_ids
from study_query_llm.services.study import StudyService, prompt_text

T0 = datetime(2024, 3, 2, 22, 50, 7, 250_000, tzinfo=UTC)  # a Saturday evening
TARGETS = [("openai", "gpt-a"), ("openai", "gpt-b"), ("anthropic", "claude-c"), ("mock", "m")]
STATUS_CYCLE = ["success", "success", "failed", "success", "timeout", "success", "cancelled"]
XSS = "<img src=x onerror=alert(1)>"
N_CALLS = 137


@dataclass
class Record:
    """What the test inserted: the service, the rows as pandas sees them, group ids."""

    engine: Engine
    study: StudyService
    frame: pd.DataFrame
    batch_id: int
    label_id: int
    empty_id: int
    members: dict[int, list[int]]


def _calls() -> list[NewCall]:
    calls = []
    for i in range(N_CALLS):
        provider, model = TARGETS[(i * 7) % len(TARGETS)]
        status = STATUS_CYCLE[i % len(STATUS_CYCLE)]
        ok = status == "success"
        word = "needle" if i % 10 == 3 else "hay"
        prompt = f"Question {i}: tell me about {word} number {i % 5}"
        if i == 11:
            prompt = f"{XSS} needle"
        calls.append(
            NewCall(
                provider=provider,
                model=model,
                status=status,
                request_json={"messages": [{"role": "user", "content": prompt}]},
                response_json={"text": f"Answer {i} about {'NEEDLE' if i % 15 == 0 else 'x'}"}
                if ok
                else None,
                error_json=None if ok else {"message": f"boom {i}"},
                latency_ms=None if i % 13 == 0 else float((i * 37) % 997) + 0.5,
                prompt_tokens=None if i % 11 == 0 else 10 + i % 7,
                completion_tokens=(20 + i % 9) if ok else None,
                total_tokens=(30 + i % 7 + i % 9) if ok else None,
                cost_usd=None if i % 17 == 0 else round(0.0001 * (i % 23), 6),
                # Spread over ~3 weeks; several calls share a timestamp (keyset ties).
                created_at=T0 + timedelta(seconds=(i // 3) * 4_513 + (i % 3 == 2) * 0.5),
            )
        )
    return calls


def _frame(calls: list[NewCall], ids: list[int]) -> pd.DataFrame:
    rows = []
    for call_id, call in zip(ids, calls, strict=True):
        row = call.row()
        rows.append(
            {
                "id": call_id,
                "provider": call.provider,
                "model": call.model,
                "status": call.status,
                "created_at": row["created_at"],
                **{
                    k: row[k]
                    for k in (
                        "latency_ms",
                        "prompt_tokens",
                        "completion_tokens",
                        "total_tokens",
                        "cost_usd",
                    )
                },
                "prompt": call.request_json["messages"][0]["content"],
                "response": (call.response_json or {}).get("text", ""),
            }
        )
    frame = pd.DataFrame(rows)
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    for name in ("latency_ms", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"):
        frame[name] = pd.to_numeric(frame[name]).astype("float64")
    frame["failed"] = frame["status"] != "success"
    return frame


@pytest.fixture
def record(db_url: str) -> Record:
    engine = get_engine(db_url)
    calls = _calls()
    with UnitOfWork(engine) as uow:
        ids = uow.calls.add_many(calls)
        batch = uow.groups.create("batch", "batch one", description="a batch")
        # Batch: positions in prompt order; every 4th call is a retry before its final.
        batch_ids = ids[:40]
        for position, call_id in enumerate(batch_ids):
            role = "retry" if position % 4 == 1 else "final"
            uow.groups.add_member_at(batch.id, call_id, position=position // 2, role=role)
        label = uow.groups.create("label", "interesting")
        label_ids = ids[30:90:3]
        uow.groups.add_members(label.id, label_ids)
        empty = uow.groups.create("experiment", "nothing yet")
        uow.commit()
        members = {batch.id: batch_ids, label.id: label_ids, empty.id: []}
        return Record(
            engine, StudyService(engine), _frame(calls, ids), batch.id, label.id, empty.id, members
        )


def _stats(rows: pd.DataFrame) -> dict[str, Any]:
    """What the service should report about these rows, computed by pandas."""
    latencies = rows["latency_ms"].dropna()
    out: dict[str, Any] = {
        "count": len(rows),
        "failures": int(rows["failed"].sum()),
        "failure_rate": float(rows["failed"].mean()) if len(rows) else None,
        "total_tokens": int(rows["total_tokens"].sum()),
        "prompt_tokens": int(rows["prompt_tokens"].sum()),
        "cost_usd": float(rows["cost_usd"].sum()),
        "latency_mean_ms": float(latencies.mean()) if len(latencies) else None,
    }
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        out[f"latency_{label}_ms"] = float(latencies.quantile(q)) if len(latencies) else None
    return out


def _close(got: Any, want: Any, name: str) -> None:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        assert got is None or (isinstance(got, float) and math.isnan(got)), name
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), name


def _select(frame: pd.DataFrame, filters: CallFilters, members: dict[int, list[int]]):
    rows = frame
    if filters.start is not None:
        rows = rows[rows["created_at"] >= pd.Timestamp(filters.start)]
    if filters.end is not None:
        rows = rows[rows["created_at"] < pd.Timestamp(filters.end)]
    if filters.providers:
        rows = rows[rows["provider"].isin(filters.providers)]
    if filters.models:
        rows = rows[rows["model"].isin(filters.models)]
    if filters.status is not None:
        rows = rows[rows["status"] == filters.status]
    if filters.group_id is not None:
        rows = rows[rows["id"].isin(members[filters.group_id])]
    return rows


def _filter_cases(record: Record) -> list[CallFilters]:
    return [
        CallFilters(),
        CallFilters(providers=("openai",)),
        CallFilters(models=("claude-c", "m"), status="success"),
        CallFilters(start=T0 + timedelta(days=2), end=T0 + timedelta(days=9)),
        CallFilters(group_id=record.label_id),
        CallFilters(providers=("nobody",)),
    ]


def test_summary_matches_pandas(record: Record) -> None:
    for filters in _filter_cases(record):
        rows = _select(record.frame, filters, record.members)
        want = _stats(rows)
        got = record.study.summary(filters)
        assert got["calls"] == want["count"]
        assert got["successes"] == want["count"] - want["failures"]
        assert got["failures"] == want["failures"]
        for key in (
            "failure_rate",
            "total_tokens",
            "prompt_tokens",
            "cost_usd",
            "latency_mean_ms",
            "latency_p50_ms",
            "latency_p90_ms",
            "latency_p99_ms",
        ):
            _close(got[key], want[key], f"{key} for {filters}")
        assert got["providers"] == rows["provider"].nunique()
        assert got["models"] == len(rows.groupby(["provider", "model"]))


def test_compare_matches_pandas_with_percentiles(record: Record) -> None:
    filters = CallFilters(start=T0 + timedelta(hours=5))
    rows = _select(record.frame, filters, record.members)
    got = record.study.compare(filters)
    expected_keys = sorted(rows.groupby(["provider", "model"]).groups)
    assert list(zip(got["provider"], got["model"], strict=True)) == expected_keys
    assert list(got["target"]) == [f"{p} / {m}" for p, m in expected_keys]
    for row in got.to_dict("records"):
        part = rows[(rows["provider"] == row["provider"]) & (rows["model"] == row["model"])]
        want = _stats(part)
        assert row["count"] == want["count"] and row["failures"] == want["failures"]
        _close(row["failure_rate"], want["failure_rate"], "failure_rate")
        _close(row["total_tokens_sum"], want["total_tokens"], "total_tokens")
        _close(row["cost_usd_sum"], want["cost_usd"], "cost")
        for q in ("p50", "p90", "p99"):
            _close(row[f"latency_{q}_ms"], want[f"latency_{q}_ms"], q)
        _close(row["latency_mean_ms"], want["latency_mean_ms"], "mean")


def _floor(ts: pd.Series, bucket: str) -> pd.Series:
    if bucket == "week":  # weeks start on Monday, like date_trunc('week')
        return (ts - pd.to_timedelta(ts.dt.day_of_week, unit="D")).dt.floor("D")
    return ts.dt.floor({"minute": "min", "hour": "h", "day": "D"}[bucket])


@pytest.mark.parametrize("bucket", ["minute", "hour", "day", "week"])
@pytest.mark.parametrize("by", [None, "provider", "model"])
def test_time_series_buckets_match_pandas(record: Record, bucket: str, by: str | None) -> None:
    filters = CallFilters(status=None, providers=("openai", "anthropic", "mock"))
    rows = _select(record.frame, filters, record.members).assign(
        bucket=lambda f: _floor(f["created_at"], bucket)
    )
    keys = ["bucket", *([by] if by else [])]
    got = record.study.time_series(filters, bucket=bucket, by=by)
    assert list(got.columns[: len(keys)]) == keys
    assert str(got["bucket"].dtype).startswith("datetime64") and got["bucket"].dt.tz is not None
    grouped = rows.groupby(keys, sort=True)
    assert len(got) == grouped.ngroups
    for row in got.to_dict("records"):
        key = tuple(row[k] for k in keys)
        part = grouped.get_group(key if len(keys) > 1 else (key[0],))
        want = _stats(part)
        assert row["count"] == want["count"], key
        assert row["failures"] == want["failures"], key
        _close(row["cost_usd_sum"], want["cost_usd"], f"cost {key}")
        _close(row["total_tokens_sum"], want["total_tokens"], f"tokens {key}")
        _close(row["latency_p50_ms"], want["latency_p50_ms"], f"p50 {key}")
        _close(row["latency_mean_ms"], want["latency_mean_ms"], f"mean {key}")
    assert got["bucket"].is_monotonic_increasing


def test_time_series_of_nothing_is_an_empty_frame(record: Record) -> None:
    got = record.study.time_series(CallFilters(providers=("nobody",)), bucket="day", by="model")
    assert got.empty and list(got.columns[:2]) == ["bucket", "model"]
    with pytest.raises(ValueError, match="bucket"):
        record.study.time_series(CallFilters(), bucket="fortnight")


def test_latency_samples_are_the_newest_per_model(record: Record) -> None:
    got = record.study.latency_samples(CallFilters(), per_model=5)
    ok = record.frame[(record.frame["status"] == "success") & record.frame["latency_ms"].notna()]
    for (provider, model), part in ok.groupby(["provider", "model"]):
        newest = part.sort_values(["created_at", "id"], ascending=False).head(5)
        mine = got[(got["provider"] == provider) & (got["model"] == model)]
        assert sorted(mine["latency_ms"]) == sorted(newest["latency_ms"])
        assert set(mine["target"]) == {f"{provider} / {model}"}


@pytest.mark.parametrize("page_size", [1, 7, 50, 500])
def test_recent_calls_pages_cover_every_row_once(record: Record, page_size: int) -> None:
    for filters in (CallFilters(), CallFilters(providers=("openai",), status="success")):
        expected = _select(record.frame, filters, record.members).sort_values(
            ["created_at", "id"], ascending=False
        )
        seen: list[int] = []
        after = None
        pages = 0
        while True:
            page = record.study.recent_calls(filters, limit=page_size, after=after)
            assert len(page.frame) <= page_size
            seen += list(page.frame["id"])
            pages += 1
            if page.next_cursor is None:
                break
            after = page.next_cursor
            assert pages <= len(expected) + 1
        assert seen == list(expected["id"])  # every row once, newest first
        assert record.study.count(filters) == len(expected)


def test_recent_calls_rows_show_previews_and_errors(record: Record) -> None:
    frame = record.study.recent_calls(CallFilters(status="failed"), limit=3).frame
    assert list(frame.columns[:5]) == ["id", "created_at", "provider", "model", "status"]
    assert all(text.startswith("boom ") for text in frame["response"])
    detail = record.study.call(int(record.frame.loc[11, "id"]))
    assert detail is not None and detail["prompt"] == f"{XSS} needle"
    assert {g["name"] for g in detail["groups"]} == {"batch one"}
    assert record.study.call(10**9) is None


def test_search_returns_ranked_marked_snippets(record: Record) -> None:
    frame = record.frame
    mask = frame["prompt"].str.contains("needle", case=False) | frame["response"].str.contains(
        "needle", case=False
    )
    hits = record.study.search("needle", CallFilters(), limit=200)
    assert sorted(hits["call_id"]) == sorted(frame.loc[mask, "id"])
    assert list(hits["rank"]) == sorted(hits["rank"], reverse=True)
    for row in hits.to_dict("records"):
        marked = row["prompt_snippet"] + row["response_snippet"]
        assert "[[" in marked and "]]" in marked
        assert "needle" in marked.lower()
    # Filters apply to search too.
    only = record.study.search("needle", CallFilters(providers=("openai",)), limit=200)
    assert set(only["provider"]) <= {"openai"}
    assert len(only) == int((mask & (frame["provider"] == "openai")).sum())
    # The raw text comes back unescaped; escaping is the UI's job.
    xss = record.study.search("onerror", CallFilters())
    assert len(xss) == 1 and "<img" in xss.loc[0, "prompt_snippet"]
    for bad in ("", "   "):
        with pytest.raises(InvalidSearchError):
            record.study.search(bad)


def test_groups_list_matches_pandas(record: Record) -> None:
    got = record.study.groups()
    assert list(got["id"]) == [record.empty_id, record.label_id, record.batch_id]  # newest first
    for filters in (CallFilters(), CallFilters(providers=("openai",))):
        got = record.study.groups(filters=filters).set_index("id")
        for group_id, ids in record.members.items():
            rows = _select(record.frame, filters, record.members)
            rows = rows[rows["id"].isin(ids)]
            want = _stats(rows)
            row = got.loc[group_id]
            assert row["members"] == len(ids)
            assert row["calls"] == want["count"]
            assert row["failures"] == want["failures"]  # 0 for the empty group
            _close(row["failure_rate"], want["failure_rate"], "failure_rate")
            _close(row["total_tokens"], want["total_tokens"], "tokens")
            _close(row["cost_usd"], want["cost_usd"], "cost")
            _close(row["latency_mean_ms"], want["latency_mean_ms"], "latency")
    assert list(record.study.groups("label")["name"]) == ["interesting"]
    only = record.study.groups(filters=CallFilters(group_id=record.batch_id))
    assert list(only["id"]) == [record.batch_id]
    assert record.study.group_types() == ["batch", "experiment", "label"]
    # The pickers' choices: the same groups in the same order, names and types only.
    choices = record.study.group_choices()
    listed = record.study.groups()
    assert list(choices.columns) == ["id", "group_type", "name"]
    assert choices.to_dict("records") == listed[["id", "group_type", "name"]].to_dict("records")
    counted = record.study.group_choices(members=True)
    assert list(counted["members"]) == list(listed["members"])  # the empty group has 0


def test_groups_list_a_page_at_a_time(record: Record) -> None:
    """Pages of the list are slices of the whole list (same statistics), newest first;
    the count says how many there are for the same type and filters."""
    for group_type, filters in (
        (None, CallFilters()),
        (None, CallFilters(providers=("openai",))),
        ("label", CallFilters()),
        (None, CallFilters(group_id=record.batch_id)),
    ):
        whole = record.study.groups(group_type, filters)
        assert record.study.group_count(group_type, filters) == len(whole)
        pages = [
            record.study.groups(group_type, filters, limit=2, offset=offset)
            for offset in range(0, len(whole) + 2, 2)
        ]
        assert all(len(page) <= 2 for page in pages) and pages[-1].empty
        joined = pd.concat([page for page in pages if not page.empty], ignore_index=True)
        # (the same sums, added up in the order the database chose for each query)
        pd.testing.assert_frame_equal(
            joined.fillna({"description": ""}),
            whole.fillna({"description": ""}),
            check_dtype=False,
            rtol=1e-12,
        )
    assert record.study.group_count() == 3
    for bad in ({"limit": 0}, {"limit": 5, "offset": -1}):
        with pytest.raises(ValueError, match="limit must be at least 1"):
            record.study.groups(**bad)


def test_group_calls_in_position_order(record: Record) -> None:
    got = record.study.group_calls(record.batch_id)
    ids = record.members[record.batch_id]
    assert list(got["id"]) == ids  # positions 0,0,1,1,... then insertion order
    assert list(got["position"]) == [i // 2 for i in range(len(ids))]
    page = record.study.group_calls(record.batch_id, limit=10, offset=30)
    assert list(page["id"]) == ids[30:40]
    assert record.study.group_size(record.batch_id) == len(ids)
    assert record.study.group_calls(record.empty_id).empty


def test_compare_groups_matches_pandas(record: Record) -> None:
    ids = [record.label_id, record.batch_id, record.empty_id, 10**9]
    got = record.study.compare_groups(ids, CallFilters(status=None))
    assert list(got["group_id"]) == ids[:3]  # in the order asked; unknown ids left out
    assert list(got["group"]) == ["interesting", "batch one", "nothing yet"]
    for row in got.to_dict("records"):
        rows = record.frame[record.frame["id"].isin(record.members[row["group_id"]])]
        want = _stats(rows)
        assert row["calls"] == want["count"] and row["failures"] == want["failures"]
        for key in ("failure_rate", "cost_usd", "latency_p50_ms", "latency_p90_ms"):
            _close(row[key], want[key], key)
    narrowed = record.study.compare_groups(ids[:2], CallFilters(providers=("mock",)))
    for row in narrowed.to_dict("records"):
        rows = record.frame[record.frame["id"].isin(record.members[row["group_id"]])]
        assert row["calls"] == int((rows["provider"] == "mock").sum())


def test_batch_matrix_matches_pandas(record: Record) -> None:
    got = record.study.batch_matrix(record.batch_id)
    ids = record.members[record.batch_id]
    frame = record.frame.set_index("id").loc[ids].reset_index()
    final = frame[[i % 4 != 1 for i in range(len(frame))]].copy()
    final["target"] = final["provider"] + " / " + final["model"]
    final["answer"] = [
        r if s == "success" else f"({s})"
        for r, s in zip(final["response"], final["status"], strict=True)
    ]
    first = final.drop_duplicates(["prompt", "target"])
    assert list(got["prompt"]) == list(dict.fromkeys(final["prompt"]))
    assert set(got.columns) == {"prompt", *first["target"]}
    for row in first.to_dict("records"):
        cell = got.loc[got["prompt"] == row["prompt"], row["target"]].item()
        assert cell == row["answer"]
    assert list(record.study.batch_matrix(record.empty_id).columns) == ["prompt"]


def test_empty_database_gives_empty_frames(db_url: str) -> None:
    study = StudyService(get_engine(db_url))
    summary = study.summary()
    assert summary["calls"] == 0 and summary["failure_rate"] is None
    assert study.compare().empty and study.latency_samples().empty
    assert study.recent_calls().frame.empty and study.recent_calls().next_cursor is None
    assert study.groups().empty and study.compare_groups([1]).empty


def test_group_service_edits(record: Record) -> None:
    groups = GroupService(record.engine)
    assert groups.rename(record.label_id, "  very   interesting ") == "very interesting"
    groups.label("other", [int(record.frame.loc[0, "id"])])
    with pytest.raises(GroupExistsError):  # another label group has that name
        groups.rename(record.label_id, "other")
    groups.rename(record.batch_id, "other")  # a batch may share a label's name
    groups.rename(record.batch_id, "batch one")
    with pytest.raises(ValueError, match="empty"):
        groups.rename(record.label_id, "   ")
    with pytest.raises(LookupError):
        groups.rename(10**9, "x")
    groups.describe(record.batch_id, "first try")
    listed = record.study.groups().set_index("id")
    assert listed.loc[record.label_id, "name"] == "very interesting"
    assert listed.loc[record.batch_id, "description"] == "first try"
    groups.describe(record.batch_id, "  ")
    assert pd.isna(record.study.groups().set_index("id").loc[record.batch_id, "description"])

    ids = [int(i) for i in record.frame["id"][:5]]
    first = groups.label("checked", ids[:3])
    again = groups.label("checked", ids)
    assert (first.added, first.already) == (3, 0)
    assert (again.group_id, again.added, again.already) == (first.group_id, 2, 3)
    assert list(record.study.group_calls(first.group_id)["id"]) == ids
    with pytest.raises(LookupError, match=str(10**9)):
        groups.label("checked", [ids[0], 10**9])
    assert record.study.group_size(first.group_id) == 5  # nothing written on error
    with pytest.raises(ValueError):
        groups.label("checked", [])


def test_parse_ids() -> None:
    assert parse_ids(" 3, 5 7,,9 ") == [3, 5, 7, 9]
    with pytest.raises(ValueError, match="not a call id"):
        parse_ids("3, x7")


def test_calls_table_is_every_matching_call(record: Record) -> None:
    filters = CallFilters(providers=("openai",))
    expected = _select(record.frame, filters, record.members)
    got = record.study.calls_table(filters)
    assert sorted(got["id"]) == sorted(expected["id"]) and got["id"].is_unique
    assert len(record.study.calls_table(CallFilters(), max_rows=10)) == 10


def test_group_calls_and_size_take_filters(record: Record) -> None:
    ids = record.members[record.batch_id]
    members = record.frame.set_index("id").loc[ids].reset_index()
    members["position"] = [i // 2 for i in range(len(ids))]
    for filters in (
        CallFilters(providers=("openai",)),
        CallFilters(status="success", models=("claude-c", "m")),
        CallFilters(start=T0 + timedelta(hours=10)),
        CallFilters(group_id=record.label_id),  # members of both groups
        CallFilters(providers=("nobody",)),
    ):
        want = _select(members, filters, record.members)
        got = record.study.group_calls(record.batch_id, filters=filters)
        assert list(got["id"]) == list(want["id"]), filters
        assert list(got["position"]) == list(want["position"])
        assert record.study.group_size(record.batch_id, filters) == len(want)
        page = record.study.group_calls(record.batch_id, 3, 2, filters)
        assert list(page["id"]) == list(want["id"])[2:5]
    assert record.study.group_size(record.batch_id) == len(ids)


def test_batch_matrix_takes_filters(record: Record) -> None:
    filters = CallFilters(status="success", providers=("openai", "mock"))
    got = record.study.batch_matrix(record.batch_id, filters)
    ids = record.members[record.batch_id]
    frame = record.frame.set_index("id").loc[ids].reset_index()
    final = frame[[i % 4 != 1 for i in range(len(frame))]]
    final = _select(final, filters, record.members).assign(
        target=lambda f: f["provider"] + " / " + f["model"]
    )
    first = final.drop_duplicates(["prompt", "target"])
    assert list(got["prompt"]) == list(dict.fromkeys(final["prompt"]))
    assert set(got.columns) == {"prompt", *first["target"]}
    for row in first.to_dict("records"):
        assert got.loc[got["prompt"] == row["prompt"], row["target"]].item() == row["response"]
    empty = record.study.batch_matrix(record.batch_id, CallFilters(providers=("nobody",)))
    assert list(empty.columns) == ["prompt"] and empty.empty


def test_facets_take_filters(record: Record) -> None:
    frame = record.frame
    assert record.study.facets() == {
        "providers": sorted(frame["provider"].unique()),
        "models": sorted(frame["model"].unique()),
    }
    for filters in (
        CallFilters(providers=("openai",)),
        CallFilters(group_id=record.label_id, status="success"),
        CallFilters(providers=("nobody",)),
    ):
        rows = _select(frame, filters, record.members)
        assert record.study.facets(filters) == {
            "providers": sorted(rows["provider"].unique()),
            "models": sorted(rows["model"].unique()),
        }, filters


# --- embeddings ---------------------------------------------------------------------------

EMBED_MODEL = "mock-embed"


def _embedding_service(engine: Engine) -> EmbeddingService:
    settings = Settings(_env_file=None)
    return EmbeddingService(engine, providers=lambda _id: create("mock", settings, latency_ms=0))


@dataclass
class Embedded:
    """The record with the responses of some calls embedded through EmbeddingService."""

    record: Record
    service: EmbeddingService
    vectors: dict[str, list[float]]  # by embedded text
    embedded_ids: list[int]  # the calls whose response was embedded
    missing_ids: list[int]  # successful batch members left out


@pytest.fixture
async def embedded(record: Record) -> Embedded:
    frame = record.frame
    ok = frame[frame["status"] == "success"]
    batch_ok = [i for i in record.members[record.batch_id] if i in set(ok["id"])]
    missing = batch_ok[-3:]
    chosen = ok[~ok["id"].isin(missing)]
    service = _embedding_service(record.engine)
    results = await service.embed(list(chosen["response"]), provider="mock", model=EMBED_MODEL)
    vectors = {r.text: r.vector for r in results}
    return Embedded(record, service, vectors, list(chosen["id"]), missing)


def _pca(vectors: list[list[float]]) -> np.ndarray:
    return PCA(n_components=2, random_state=0).fit_transform(np.asarray(vectors))


def _cosine_ranking(
    query: list[float], rows: pd.DataFrame, vectors: dict[str, list[float]]
) -> list[tuple[int, float]]:
    """(call id, cosine similarity) of every row, best first: what numpy says."""
    matrix = np.asarray([vectors[t] for t in rows["response"]])
    q = np.asarray(query)
    scores = matrix @ q / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(q))
    order = np.argsort(-scores, kind="stable")
    return [(int(rows["id"].iloc[i]), float(scores[i])) for i in order]


def test_embedding_map_is_pca_of_the_stored_vectors(embedded: Embedded) -> None:
    record = embedded.record
    study = record.study
    got = study.embedding_map(CallFilters(), EMBED_MODEL, groups=[record.batch_id])
    rows = record.frame[record.frame["id"].isin(embedded.embedded_ids)]
    rows = rows[rows["id"].isin(record.members[record.batch_id])]
    rows = rows.sort_values(["created_at", "id"], ascending=False)
    assert list(got["call_id"]) == list(rows["id"])  # newest first
    assert list(got["text"]) == list(rows["response"])
    assert list(got["provider"]) == list(rows["provider"])
    assert set(got["group"]) == {"batch one"} and set(got["status"]) == {"success"}
    want = _pca([embedded.vectors[t] for t in got["text"]])
    np.testing.assert_allclose(got[["x", "y"]].to_numpy(), want, atol=1e-9)
    assert got.attrs["missing"] == 3 and got.attrs["truncated"] is False

    # The three successful members never embedded are what is left to compute.
    missing = study.missing_embeddings(CallFilters(), EMBED_MODEL, groups=[record.batch_id])
    assert sorted(missing["call_id"]) == sorted(embedded.missing_ids)
    texts = record.frame.set_index("id").loc[list(missing["call_id"]), "response"]
    assert list(missing["text"]) == list(texts)
    # Without groups: every matching call with a response (never the embedding calls).
    everywhere = study.missing_embeddings(CallFilters(), EMBED_MODEL)
    assert sorted(everywhere["call_id"]) == sorted(embedded.missing_ids)
    assert study.missing_embeddings(CallFilters(), "another-model")["call_id"].nunique() == len(
        record.frame[record.frame["status"] == "success"]
    )

    # `limit` keeps the newest calls with a response (embedded or not) and says so.
    candidates = record.frame[
        record.frame["id"].isin(record.members[record.batch_id])
        & (record.frame["status"] == "success")
    ].sort_values(["created_at", "id"], ascending=False)["id"]
    newest = study.embedding_map(CallFilters(), EMBED_MODEL, groups=[record.batch_id], limit=8)
    assert newest.attrs["truncated"] and newest.attrs["missing"] == 3
    assert list(newest["call_id"]) == [i for i in candidates[:8] if i in embedded.embedded_ids]


async def test_embedding_map_fills_in_after_the_missing_are_embedded(
    embedded: Embedded,
) -> None:
    record = embedded.record
    missing = record.study.missing_embeddings(CallFilters(), EMBED_MODEL, groups=[record.batch_id])
    results = await embedded.service.embed(
        list(missing["text"]), provider="mock", model=EMBED_MODEL
    )
    assert not any(r.cached for r in results)
    assert record.study.missing_embeddings(
        CallFilters(), EMBED_MODEL, groups=[record.batch_id]
    ).empty
    got = record.study.embedding_map(CallFilters(), EMBED_MODEL, groups=[record.batch_id])
    assert set(embedded.missing_ids) <= set(got["call_id"]) and got.attrs["missing"] == 0
    # A provider that did not embed these texts has no vectors for them.
    other = record.study.embedding_map(
        CallFilters(), EMBED_MODEL, groups=[record.batch_id], provider="openai"
    )
    assert other.empty and other.attrs["missing"] == len(got)


def test_embedding_map_is_restricted_by_filters_and_groups(embedded: Embedded) -> None:
    record = embedded.record
    frame = record.frame[record.frame["id"].isin(embedded.embedded_ids)]
    filters = CallFilters(providers=("openai",), start=T0 + timedelta(days=1))
    got = record.study.embedding_map(filters, EMBED_MODEL)
    want = _select(frame, filters, record.members)
    assert sorted(got["call_id"]) == sorted(want["id"]) and set(got["provider"]) == {"openai"}
    assert got["group"].isna().all()
    np.testing.assert_allclose(
        got[["x", "y"]].to_numpy(), _pca([embedded.vectors[t] for t in got["text"]]), atol=1e-9
    )
    # The filters' group names the rows.
    label = record.study.embedding_map(CallFilters(group_id=record.label_id), EMBED_MODEL)
    assert sorted(label["call_id"]) == sorted(
        set(record.members[record.label_id]) & set(embedded.embedded_ids)
    )
    assert set(label["group"]) == {"interesting"}

    # Two groups: one row per membership; a call in both is one point, projected once.
    both = record.study.embedding_map(
        CallFilters(), EMBED_MODEL, groups=[record.batch_id, record.label_id]
    )
    shared = set(record.members[record.batch_id]) & set(record.members[record.label_id])
    shared &= set(embedded.embedded_ids)
    assert shared and both.groupby("call_id").size().max() == 2
    assert set(both.loc[both["call_id"].isin(shared), "group"]) == {"batch one", "interesting"}
    once = both.drop_duplicates("call_id")
    np.testing.assert_allclose(
        once[["x", "y"]].to_numpy(),
        _pca([embedded.vectors[t] for t in once["text"]]),
        atol=1e-9,
    )
    assert (both.groupby("call_id")[["x", "y"]].nunique() == 1).all().all()


async def test_embedding_map_of_prompts(record: Record) -> None:
    ids = record.members[record.label_id]
    prompts = list(record.frame.set_index("id").loc[ids, "prompt"])
    results = await _embedding_service(record.engine).embed(
        prompts, provider="mock", model=EMBED_MODEL
    )
    got = record.study.embedding_map(
        CallFilters(), EMBED_MODEL, groups=[record.label_id], text="prompt"
    )
    assert sorted(got["call_id"]) == sorted(ids)  # failed calls have prompts too
    by_text = {r.text: r.vector for r in results}
    np.testing.assert_allclose(
        got[["x", "y"]].to_numpy(), _pca([by_text[t] for t in got["text"]]), atol=1e-9
    )
    assert record.study.embedding_map(
        CallFilters(), EMBED_MODEL, groups=[record.label_id]
    ).empty  # their responses were not embedded


def test_neighbours_match_a_numpy_cosine_ranking(embedded: Embedded) -> None:
    record = embedded.record
    rng = np.random.default_rng(7)
    query = list(rng.normal(size=len(next(iter(embedded.vectors.values())))))
    frame = record.frame[record.frame["id"].isin(embedded.embedded_ids)]
    for filters, groups in (
        (CallFilters(), ()),
        (CallFilters(providers=("anthropic", "mock")), ()),
        (CallFilters(end=T0 + timedelta(days=5)), (record.batch_id,)),
        (CallFilters(group_id=record.label_id), ()),
    ):
        rows = _select(frame, filters, record.members)
        if groups:
            rows = rows[rows["id"].isin(record.members[groups[0]])]
        want = _cosine_ranking(query, rows, embedded.vectors)[:7]
        got = record.study.neighbours(filters, EMBED_MODEL, vector=query, k=7, groups=groups)
        assert list(got["call_id"]) == [i for i, _ in want], filters
        np.testing.assert_allclose(got["similarity"], [s for _, s in want], atol=1e-9)
        assert list(got["rank"]) == list(range(1, len(want) + 1))
        texts = record.frame.set_index("id").loc[list(got["call_id"]), "response"]
        assert list(got["text"]) == list(texts)
    nobody = record.study.neighbours(CallFilters(providers=("nobody",)), EMBED_MODEL, vector=query)
    assert nobody.empty


def test_neighbours_of_a_call_leave_the_call_out(embedded: Embedded) -> None:
    record = embedded.record
    frame = record.frame[record.frame["id"].isin(embedded.embedded_ids)]
    call_id = embedded.embedded_ids[5]
    own = embedded.vectors[frame.set_index("id").loc[call_id, "response"]]
    want = _cosine_ranking(own, frame[frame["id"] != call_id], embedded.vectors)[:10]
    got = record.study.neighbours(CallFilters(), EMBED_MODEL, call_id=call_id, k=10)
    assert call_id not in set(got["call_id"]) and len(got) == 10
    assert list(got["call_id"]) == [i for i, _ in want]
    np.testing.assert_allclose(got["similarity"], [s for _, s in want], atol=1e-9)
    # Filters restrict the candidates, not the call compared with.
    openai = record.study.neighbours(
        CallFilters(providers=("openai",)), EMBED_MODEL, call_id=call_id, k=200
    )
    rows = frame[(frame["provider"] == "openai") & (frame["id"] != call_id)]
    assert list(openai["call_id"]) == [i for i, _ in _cosine_ranking(own, rows, embedded.vectors)]
    # Groups name the hits.
    grouped = record.study.neighbours(
        CallFilters(), EMBED_MODEL, call_id=call_id, k=200, groups=[record.label_id]
    )
    assert set(grouped["group"]) == {"interesting"}
    assert set(grouped["call_id"]) == set(record.members[record.label_id]) & set(
        embedded.embedded_ids
    ) - {call_id}


def test_embedding_questions_are_answered_in_a_fixed_number_of_queries(
    embedded: Embedded,
) -> None:
    record = embedded.record
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            statements.append(statement)

    event.listen(record.engine, "before_cursor_execute", count)
    try:
        for groups in ([record.label_id], [record.batch_id, record.label_id], []):
            statements.clear()
            record.study.embedding_map(CallFilters(), EMBED_MODEL, groups=groups)
            assert len(statements) == 1, groups
            statements.clear()
            record.study.missing_embeddings(CallFilters(), EMBED_MODEL, groups=groups)
            assert len(statements) == 1, groups
        record.study.neighbours(CallFilters(), EMBED_MODEL, vector=[1.0] * 8)  # warm-up
        for groups in ([record.label_id], []):
            statements.clear()
            record.study.neighbours(
                CallFilters(), EMBED_MODEL, call_id=embedded.embedded_ids[0], k=50, groups=groups
            )
            assert len(statements) == 3, groups  # the call's vector, candidates, details
    finally:
        event.remove(record.engine, "before_cursor_execute", count)


def test_embedding_questions_refuse_bad_input(embedded: Embedded) -> None:
    study = embedded.record.study
    call_id = embedded.embedded_ids[0]
    with pytest.raises(ValueError, match="either a vector or a call id"):
        study.neighbours(CallFilters(), EMBED_MODEL)
    with pytest.raises(ValueError, match="either a vector or a call id"):
        study.neighbours(CallFilters(), EMBED_MODEL, vector=[1.0], call_id=call_id)
    with pytest.raises(ValueError, match="all zeros"):
        study.neighbours(CallFilters(), EMBED_MODEL, vector=[0.0] * 8)
    with pytest.raises(ValueError, match="k must be"):
        study.neighbours(CallFilters(), EMBED_MODEL, call_id=call_id, k=0)
    with pytest.raises(LookupError, match=f"call {embedded.missing_ids[0]}"):
        study.neighbours(CallFilters(), EMBED_MODEL, call_id=embedded.missing_ids[0])
    with pytest.raises(ValueError, match="text must be"):
        study.embedding_map(CallFilters(), EMBED_MODEL, text="answer")
    with pytest.raises(ValueError, match="embedding model"):
        study.missing_embeddings(CallFilters(), "  ")
    with pytest.raises(ValueError, match="projection"):
        study.embedding_map(CallFilters(), EMBED_MODEL, method="tsne")
    # A vector of another length matches nothing.
    assert study.neighbours(CallFilters(), EMBED_MODEL, vector=[1.0, 2.0]).empty


def test_umap_is_optional(embedded: Embedded) -> None:
    study = embedded.record.study
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(ValueError, match="pip install umap-learn"):
            study.embedding_map(CallFilters(), EMBED_MODEL, method="umap")
    else:
        got = study.embedding_map(CallFilters(), EMBED_MODEL, method="umap")
        assert len(got) == len(embedded.embedded_ids) and got[["x", "y"]].notna().all().all()


def test_call_text_in_sql_is_the_text_python_reads(db_url: str) -> None:
    engine = get_engine(db_url)
    requests: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "only"}]},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "second ünïcode 'quote' \"dq\""},
                {"role": "assistant", "content": "trailing"},
            ]
        },
        {"messages": ["not an object", {"role": "user", "content": XSS}]},
        {"prompt": "a completion prompt"},
        {"input": "an input"},
        {"messages": "not a list", "prompt": "the prompt"},
        {"options": {}},
    ]
    responses: list[dict[str, Any] | None] = [{"text": "a"}, None, {"text": 5}, {"other": 1}]
    calls = [
        NewCall(
            provider="p",
            model="m",
            request_json=request,
            response_json=responses[i % len(responses)],
        )
        for i, request in enumerate(requests)
    ]
    with UnitOfWork(engine, write=True) as uow:
        ids = uow.calls.add_many(calls)
        uow.commit()
    with UnitOfWork(engine) as uow:
        queries = StudyQueries(uow.session)
        for kind, python in (("prompt", prompt_text), ("response", None)):
            got = dict(
                uow.session.execute(
                    select(RawCall.id, queries.call_text(kind)).where(RawCall.id.in_(ids))
                ).all()
            )
            for call_id, call in zip(ids, calls, strict=True):
                if python is not None:
                    want = python(call.request_json)
                else:
                    text = (call.response_json or {}).get("text")
                    want = text if isinstance(text, str) else ""
                assert got[call_id] == want, (kind, call.request_json, call.response_json)


def test_the_dashboards_default_view_is_prepared_once_when_the_cache_is_read(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dashboard's first visitor finds the default Analytics answers computed: once per
    database per process, in the background, after the rollup cache is read."""
    import threading

    from panel_app.views.analytics import prepare_default_view
    from study_query_llm.db import migrate, rollups

    url = f"sqlite:///{tmp_path / 'prepared.db'}"
    migrate.upgrade(url)
    engine = get_engine(url)
    with UnitOfWork(engine) as uow:
        uow.calls.add_many(_calls())
        uow.commit()
    prepared: list[StudyService] = []

    def prepare(study: StudyService) -> None:
        prepared.append(study)
        prepare_default_view(study)

    first = StudyService(engine, prepare=prepare)
    StudyService(engine, prepare=prepare)  # a second session: nothing more to do
    for thread in threading.enumerate():
        if thread.name == "rollup-warm-up":
            thread.join()
    assert prepared == [first]
    with UnitOfWork(engine) as uow:
        kept = rollups.MIRROR.snapshot(uow.session).derived
    assert len(kept) == 3  # summary, comparison, time series with the tab's defaults
    # What the tab asks for first is among them: answered without computing again.
    from panel_app.views.analytics import AnalyticsView
    from study_query_llm.db import rollup_read

    def computed_again(*_args: Any) -> None:
        raise AssertionError("the default view was not prepared")

    monkeypatch.setattr(rollup_read, "_stats_columns", computed_again)
    assert first.summary()["calls"] == N_CALLS
    first.compare(CallFilters())
    defaults = AnalyticsView.param
    first.time_series(CallFilters(), defaults.bucket.default, defaults.by.default)
