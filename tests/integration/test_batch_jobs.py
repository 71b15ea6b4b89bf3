"""Resumable batch jobs on SQLite and PostgreSQL, driven against the loopback provider server.

A job and all its planned items are written before any call; `run_job` drains it with a
bounded pool, records every attempt, streams outcomes as they finish, respects global and
per-provider caps, can be cancelled and resumed, and shares one job between several
workers (PostgreSQL) or takes over a dead worker's items once their leases run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import subprocess
import sys
import weakref
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from study_query_llm.config import Settings
from study_query_llm.db import migrate
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine, run_write
from study_query_llm.db.models_jobs import BatchJob, BatchJobItem
from study_query_llm.db.models_v1 import InferenceRun
from study_query_llm.db.models_v2 import Group, GroupMember, RawCall
from study_query_llm.db.records import NewCall
from study_query_llm.db.repositories.jobs import JobRepository
from study_query_llm.providers import ProviderError, create
from study_query_llm.services._common import ProviderPool
from study_query_llm.services.inference import InferenceService, RetryPolicy
from study_query_llm.services.jobs import BatchProgress, BatchService, ItemOutcome, Target
from study_query_llm.services.recorder import CallRecorder, RecordingError
from study_query_llm.testing.server import Fault, LoopbackServer

CHAT = "/v1/chat/completions"
CLI = str(Path(sys.executable).with_name("study-query-llm"))
SUMMARY = re.compile(r"(\d+) succeeded, (\d+) failed, (\d+) cancelled, (\d+) open of (\d+)")
OPENAI = Target("openai", "gpt-4o-mini")
VLLM = Target("vllm", "meta-llama/Llama-3.1-8B-Instruct")
MOCK = Target("mock", "mock-small")
TIMEOUT_S = 120  # an upper bound for a hung run, never reached by a passing test


# --- the rig -------------------------------------------------------------------------------


@dataclass
class Rig:
    """A BatchService over a fresh recorder and inference service, with a fake sleep."""

    engine: Engine
    batches: BatchService
    inference: InferenceService
    pool: ProviderPool
    waits: list[float] = field(default_factory=list)

    def known(self, *targets: Target) -> None:
        """Note that these models answer, so the first calls to them are not probes."""
        for target in targets:
            self.pool.learn(target.provider, target.model, "chat", None)


def provider_factory(
    openai_url: str, vllm_url: str | None = None, *, mock_latency_ms: float = 0
) -> Callable[[str], Any]:
    settings = Settings(_env_file=None)

    def build(provider_id: str):
        if provider_id == "openai":
            return create(
                "openai", settings, api_key="k", base_url=openai_url, model=OPENAI.model,
                timeout_s=60,
            )  # fmt: skip
        if provider_id == "vllm":
            return create(
                "vllm", settings, api_key="k", base_url=vllm_url or openai_url,
                model=VLLM.model, timeout_s=60,
            )  # fmt: skip
        if provider_id == "mock":
            return create("mock", settings, latency_ms=mock_latency_ms)
        return create(provider_id, settings)  # unknown or unconfigured: raises

    return build


def make_rig(
    engine: Engine,
    openai_url: str,
    vllm_url: str | None = None,
    *,
    retry: RetryPolicy | None = None,
) -> Rig:
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    pool = ProviderPool(provider_factory(openai_url, vllm_url))
    inference = InferenceService(
        CallRecorder(engine),
        providers=pool,
        retry=retry or RetryPolicy(max_attempts=3, initial_backoff_s=0.01),
        sleep=fake_sleep,
    )
    return Rig(engine, BatchService(engine, inference), inference, pool, waits)


@pytest.fixture
async def rig(engine: Engine, loopback: LoopbackServer) -> AsyncIterator[Rig]:
    rig = make_rig(engine, loopback.openai_base_url)
    yield rig
    await rig.inference.aclose()


# --- reading the record --------------------------------------------------------------------


def read(engine: Engine, stmt: Any) -> list[Any]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.scalars(stmt))


def items_of(engine: Engine, job_id: int) -> list[BatchJobItem]:
    return read(
        engine,
        select(BatchJobItem).where(BatchJobItem.job_id == job_id).order_by(BatchJobItem.position),
    )


def calls_by_item(engine: Engine, job_id: int) -> dict[int, list[RawCall]]:
    """Every raw_calls row of the job, by the item it was made for, in attempt order."""
    by_item: dict[int, list[RawCall]] = defaultdict(list)
    for call in read(engine, select(RawCall).order_by(RawCall.id)):
        meta = call.metadata_json or {}
        if meta.get("batch_id") == job_id:
            by_item[meta["job_item_id"]].append(call)
    return by_item


def table_count(engine: Engine, model: Any) -> int:
    with UnitOfWork(engine) as uow:
        return int(uow.session.scalar(select(func.count()).select_from(model)))


def requests_by_prompt(server: LoopbackServer) -> Counter[str]:
    return Counter(r.json["messages"][-1]["content"] for r in server.requests if r.path == CHAT)


async def drain(agen: AsyncIterator[ItemOutcome]) -> list[ItemOutcome]:
    return [outcome async for outcome in agen]


async def run_all(batches: BatchService, job_id: int, **kwargs: Any) -> list[ItemOutcome]:
    return await asyncio.wait_for(drain(batches.run_job(job_id, **kwargs)), TIMEOUT_S)


async def wait_until(predicate: Callable[[], Any], *, within: float = 30.0) -> None:
    """Poll `predicate` (sync or async) until it is true; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not reached within {within} s")
        await asyncio.sleep(0.01)


def assert_each_item_has_one_final_record(engine: Engine, job_id: int) -> None:
    """Every item finished; its call_id is its only successful record (or its final failure)."""
    by_item = calls_by_item(engine, job_id)
    for item in items_of(engine, job_id):
        calls = by_item[item.id]
        successes = [c for c in calls if c.status == "success"]
        assert item.status in ("succeeded", "failed"), item
        assert item.call_id is not None, item
        if item.status == "succeeded":
            assert [c.id for c in successes] == [item.call_id], item
        else:
            assert successes == [], item
            assert item.call_id == calls[-1].id


# --- create --------------------------------------------------------------------------------


async def test_create_job_persists_the_plan_before_any_call(
    rig: Rig, loopback: LoopbackServer
) -> None:
    prompts = ["first prompt", "second prompt", "third prompt"]
    job_id = await rig.batches.create_job(
        prompts, [OPENAI, VLLM], n_samples=2, options={"temperature": 0.5}, name="plan"
    )

    assert loopback.request_count == 0
    assert table_count(rig.engine, RawCall) == 0
    job = read(rig.engine, select(BatchJob).where(BatchJob.id == job_id))[0]
    assert (job.name, job.status, job.total_items) == ("plan", "pending", 12)
    assert job.spec_json["options"] == {"temperature": 0.5}
    group = read(rig.engine, select(Group).where(Group.id == job.group_id))[0]
    assert (group.group_type, group.name) == ("batch", "plan")
    assert read(rig.engine, select(GroupMember)) == []

    planned = [
        (i.position, i.prompt, i.provider, i.model, i.sample_index, i.status, i.call_id)
        for i in items_of(rig.engine, job_id)
    ]
    expected = [
        (n, prompt, target.provider, target.model, sample, "pending", None)
        for n, (prompt, target, sample) in enumerate(
            (p, t, s) for p in prompts for t in (OPENAI, VLLM) for s in range(2)
        )
    ]
    assert planned == expected
    counts = await rig.batches.counts(job_id)
    assert (counts.total, counts.pending, counts.finished) == (12, 12, 0)


@pytest.mark.parametrize(
    ("prompts", "targets", "kwargs", "message"),
    [
        ([], [OPENAI], {}, "no prompts"),
        (["fine", "  \n "], [OPENAI], {}, "prompt 2 is empty"),
        (["fine"], [Target("nope", "x")], {}, "unknown provider 'nope'"),
        (["fine"], [Target("anthropic", "claude")], {}, "ANTHROPIC_API_KEY"),
        (["fine"], [OPENAI], {"options": {"temperature": 9}}, "temperature"),
        (["fine"], [OPENAI], {"options": {"bogus": 1}}, "bogus"),
        (["fine"], [OPENAI], {"n_samples": 0}, "n_samples"),
        (["fine"], [], {}, "target"),
        (["fine"], [OPENAI], {"name": "x" * 191}, "longer than 190"),
    ],
    ids=[
        "no-prompts",
        "empty-prompt",
        "unknown-provider",
        "unconfigured-provider",
        "bad-option-value",
        "unknown-option",
        "no-samples",
        "no-targets",
        "name-too-long",
    ],
)
async def test_create_job_rejects_bad_input_before_writing_anything(
    rig: Rig, loopback: LoopbackServer, prompts, targets, kwargs, message
) -> None:
    with pytest.raises((ValueError, ProviderError), match=message):
        await rig.batches.create_job(prompts, targets, **kwargs)
    for model in (BatchJob, BatchJobItem, Group, RawCall):
        assert table_count(rig.engine, model) == 0, model
    assert loopback.request_count == 0


async def test_every_batch_gets_a_group_of_its_own(rig: Rig, loopback: LoopbackServer) -> None:
    """Reruns under one name, or batches started in the same second, never share a group."""
    jobs = [
        await rig.batches.create_job(["same name"], [OPENAI], name="rerun"),
        await rig.batches.create_job(["same name"], [OPENAI], name="rerun"),
        await rig.batches.create_job(["no name"], [OPENAI]),
        await rig.batches.create_job(["no name"], [OPENAI]),
    ]
    rows = read(rig.engine, select(BatchJob).order_by(BatchJob.id))
    assert [job.id for job in rows] == jobs
    assert len({job.group_id for job in rows}) == 4
    assert [job.name for job in rows[:2]] == ["rerun", "rerun (2)"]
    assert rows[3].name == rows[2].name + " (2)"
    groups = {g.id: g.name for g in read(rig.engine, select(Group))}
    assert all(groups[job.group_id] == job.name for job in rows)

    for job_id in jobs[:2]:
        await run_all(rig.batches, job_id)
    for job in rows[:2]:
        members = read(rig.engine, select(GroupMember).where(GroupMember.group_id == job.group_id))
        [item] = items_of(rig.engine, job.id)
        assert [m.call_id for m in members] == [item.call_id]


async def test_a_prompt_with_a_nul_character_is_stored_and_run(
    rig: Rig, loopback: LoopbackServer
) -> None:
    """PostgreSQL text cannot hold NUL; the job stores U+FFFD on every database alike."""
    job_id = await rig.batches.create_job(["before\x00after", "plain"], [OPENAI])
    outcomes = await run_all(rig.batches, job_id)
    assert [item.prompt for item in items_of(rig.engine, job_id)] == ["before\ufffdafter", "plain"]
    assert all(o.status == "succeeded" for o in outcomes)
    assert loopback.count(CHAT) == 2


# --- fault injection -----------------------------------------------------------------------


async def test_fault_injection_every_attempt_recorded_and_counts_add_up(
    backend: str, engine: Engine, loopback: LoopbackServer
) -> None:
    """30% transient and 2% permanent failures: retried items succeed, nothing is lost."""
    n = 1000 if backend == "sqlite" else 300
    loopback.set_failure_rate(transient=0.3, permanent=0.02, seed=20240)
    rig = make_rig(
        engine,
        loopback.openai_base_url,
        retry=RetryPolicy(max_attempts=12, max_total_s=3600, initial_backoff_s=0.01),
    )
    progress: list[BatchProgress] = []
    try:
        prompts = [f"fault injection prompt {i}" for i in range(n)]
        job_id = await rig.batches.create_job(prompts, [OPENAI], name="faults")
        outcomes = await run_all(
            rig.batches, job_id, concurrency=16, on_progress=lambda p: progress.append(p)
        )
    finally:
        await rig.inference.aclose()

    server_calls = loopback.count(CHAT)
    items = items_of(engine, job_id)
    by_item = calls_by_item(engine, job_id)
    all_calls = [call for calls in by_item.values() for call in calls]

    # One raw_calls row per attempt the server saw, attributed to the right item.
    assert table_count(engine, RawCall) == len(all_calls) == server_calls
    seen = requests_by_prompt(loopback)
    assert {item.prompt: len(by_item[item.id]) for item in items} == dict(seen)
    assert server_calls > n * 1.2  # failures really were injected and retried

    succeeded = failed = 0
    for item in items:
        calls = by_item[item.id]
        *retried, last = calls
        assert [c.metadata_json["attempt"] for c in calls] == list(range(1, len(calls) + 1))
        for call in retried:  # only transient failures are retried
            assert call.status == "failed"
            assert call.error_json["transient"] is True
            assert call.error_json["status_code"] in (429, 503)
            assert call.metadata_json["final_attempt"] is False
        assert item.call_id == last.id
        if last.status == "success":
            assert item.status == "succeeded"
            succeeded += 1
        else:  # gave up only on a permanent failure: max_attempts was never reached
            assert (last.status, last.error_json["transient"]) == ("failed", False)
            assert last.error_json["status_code"] == 400
            assert last.metadata_json["final_attempt"] is True
            assert item.status == "failed"
            failed += 1
    assert failed > 0 and succeeded > 0
    assert sum(len(c) > 1 for c in by_item.values()) > n * 0.2

    counts = await rig.batches.counts(job_id)
    assert (counts.succeeded, counts.failed, counts.cancelled, counts.open) == (
        succeeded,
        failed,
        0,
        0,
    )
    assert counts.succeeded + counts.failed == counts.total == n
    assert table_count(engine, InferenceRun) == succeeded  # v1 row for each success only
    job = await rig.batches.job(job_id)
    assert job["status"] == "completed"

    # Streamed outcomes: one per item, agreeing with the record.
    assert sorted(o.item.id for o in outcomes) == sorted(item.id for item in items)
    status_of = {item.id: item.status for item in items}
    assert all(o.status == status_of[o.item.id] for o in outcomes if o.status == "succeeded")
    assert sum(o.status == "succeeded" for o in outcomes) == succeeded

    # The batch group holds every attempt, ordered by item position, final/retry roles.
    members = read(engine, select(GroupMember).where(GroupMember.group_id == job["group_id"]))
    members = sorted(members, key=lambda m: (m.position, m.id))
    position_of = {item.id: item.position for item in items}
    final_ids = {item.call_id for item in items}
    by_call = {call.id: call for call in all_calls}
    assert sorted(m.call_id for m in members) == sorted(by_call)
    for member in members:
        call = by_call[member.call_id]
        assert member.position == position_of[call.metadata_json["job_item_id"]]
        assert member.role == ("final" if member.call_id in final_ids else "retry")

    # Retries waited through the injected sleep (no real sleeping), once per retry.
    assert len(rig.waits) == server_calls - n
    assert progress[-1].done == progress[-1].total == n
    assert progress[-1].fraction == 1.0
    assert progress[-1].retrying == server_calls - n
    assert (progress[-1].succeeded, progress[-1].failed) == (succeeded, failed)


# --- concurrency caps ----------------------------------------------------------------------


async def test_concurrency_cap_is_respected_and_reached(rig: Rig, loopback: LoopbackServer) -> None:
    loopback.delay_s = 0.05
    # A model not seen yet is probed by one call first; this one is known, so the first
    # claimed items all start together and the cap is reached.
    rig.known(OPENAI)
    job_id = await rig.batches.create_job([f"capped {i}" for i in range(40)], [OPENAI])
    in_flight: list[int] = []
    await run_all(
        rig.batches, job_id, concurrency=5, on_progress=lambda p: in_flight.append(p.in_flight)
    )
    assert loopback.count(CHAT) == 40
    assert loopback.max_in_flight == 5
    assert 0 < max(in_flight) <= 5
    assert (await rig.batches.counts(job_id)).succeeded == 40


async def test_per_provider_caps_are_respected(engine: Engine, loopback: LoopbackServer) -> None:
    """Two providers, each on its own server, so each server counts that provider's calls."""
    loopback.delay_s = 0.05
    with LoopbackServer(delay_s=0.05) as second:
        rig = make_rig(engine, loopback.openai_base_url, second.openai_base_url)
        rig.known(OPENAI, VLLM)  # no probe calls first: the caps are reached at once
        try:
            job_id = await rig.batches.create_job(
                [f"two providers {i}" for i in range(24)], [OPENAI, VLLM]
            )
            await run_all(rig.batches, job_id, concurrency=8, per_provider={"openai": 2, "vllm": 3})
        finally:
            await rig.inference.aclose()
        assert (loopback.count(CHAT), second.count(CHAT)) == (24, 24)
        assert loopback.max_in_flight == 2
        assert second.max_in_flight == 3
        assert {r.model for r in second.requests} == {VLLM.model}
    assert (await rig.batches.counts(job_id)).succeeded == 48


# --- streaming and progress ----------------------------------------------------------------


async def test_outcomes_stream_while_items_are_still_pending(rig: Rig) -> None:
    job_id = await rig.batches.create_job([f"stream {i}" for i in range(200)], [MOCK])
    progress: list[tuple[int, int, float]] = []
    first_counts = None
    seen = 0
    async with contextlib.aclosing(
        rig.batches.run_job(
            job_id,
            concurrency=4,
            on_progress=lambda p: progress.append((p.done, p.total, p.fraction)),
        )
    ) as outcomes:
        async for outcome in outcomes:
            if first_counts is None:
                first_counts = await rig.batches.counts(job_id)
            assert outcome.status == "succeeded"
            seen += 1
    assert first_counts is not None and first_counts.pending > 100
    assert seen == 200
    dones = [done for done, _, _ in progress]
    assert dones == sorted(dones)
    assert progress[-1] == (200, 200, 1.0)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A fresh migrated SQLite database, for the tests that need only one backend."""
    url = f"sqlite:///{tmp_path / 'one.db'}"
    migrate.upgrade(url)
    yield get_engine(url)
    dispose_engine(url)


@pytest.mark.slow
async def test_twenty_thousand_items_with_bounded_memory(
    sqlite_engine: Engine, loopback: LoopbackServer
) -> None:
    """No list of results is held; claimed items and calls in flight stay bounded."""
    n, concurrency = 20_000, 32
    rig = make_rig(sqlite_engine, loopback.openai_base_url)
    job_id = await rig.batches.create_job([f"many {i}" for i in range(n)], [MOCK])
    alive = [0]  # outcomes and results not yet freed

    def freed() -> None:
        alive[0] -= 1

    def track(obj: object) -> None:
        alive[0] += 1
        weakref.finalize(obj, freed)

    max_alive = max_claimed = max_in_flight = seen = 0

    def on_progress(p: BatchProgress) -> None:
        nonlocal max_in_flight
        max_in_flight = max(max_in_flight, p.in_flight)

    try:
        async for outcome in rig.batches.run_job(
            job_id, concurrency=concurrency, on_progress=on_progress
        ):
            assert outcome.status == "succeeded"
            track(outcome)
            track(outcome.result)
            seen += 1
            del outcome
            if seen % 2000 == 0:
                gc.collect()
                max_alive = max(max_alive, alive[0])
                counts = await rig.batches.counts(job_id)
                max_claimed = max(max_claimed, counts.claimed)
    finally:
        await rig.inference.aclose()
    assert seen == n
    # Outcomes still referenced anywhere: the queue (2 x concurrency) plus the workers'.
    assert max_alive <= 2 * (3 * concurrency + 1)
    assert 0 < max_claimed <= 2 * concurrency
    assert max_in_flight <= concurrency
    counts = await rig.batches.counts(job_id)
    assert (counts.succeeded, counts.open) == (n, 0)
    assert table_count(sqlite_engine, RawCall) == n


# --- cancel and resume ---------------------------------------------------------------------


async def test_cancel_mid_run_then_reopen_and_finish(rig: Rig, loopback: LoopbackServer) -> None:
    n, concurrency = 60, 4
    job_id = await rig.batches.create_job([f"cancel me {i}" for i in range(n)], [OPENAI])
    done: list[ItemOutcome] = []
    outcomes = rig.batches.run_job(job_id, concurrency=concurrency)
    async for outcome in outcomes:
        done.append(outcome)
        if len(done) == 8:
            # From here on every call hangs on the server, so exactly `concurrency`
            # calls are in flight when the batch is cancelled.
            loopback.script(*[Fault("delay", delay_s=60)] * concurrency, path=CHAT)
            break
    consumer = asyncio.ensure_future(drain(outcomes))
    await wait_until(lambda: loopback.in_flight == concurrency)
    await rig.batches.cancel(job_id)
    rest = await asyncio.wait_for(consumer, TIMEOUT_S)
    assert all(o.status == "succeeded" for o in done + rest)

    counts = await rig.batches.counts(job_id)
    assert counts.open == 0  # nothing left claimed or pending
    assert counts.succeeded == len(done) + len(rest)
    assert counts.cancelled == n - counts.succeeded
    assert (await rig.batches.job(job_id))["status"] == "cancelled"
    cancelled_calls = read(rig.engine, select(RawCall).where(RawCall.status == "cancelled"))
    assert len(cancelled_calls) == concurrency  # the calls in flight, each recorded
    assert all(c.error_json["message"] for c in cancelled_calls)
    hung_prompts = {c.request_json["messages"][-1]["content"] for c in cancelled_calls}

    # Reopen and finish: the rest is done and nothing succeeded twice.
    reopened = await rig.batches.reopen(job_id)
    assert reopened == counts.cancelled
    before = requests_by_prompt(loopback)
    await run_all(rig.batches, job_id, concurrency=concurrency)
    counts = await rig.batches.counts(job_id)
    assert (counts.succeeded, counts.open, counts.cancelled) == (n, 0, 0)
    assert (await rig.batches.job(job_id))["status"] == "completed"
    assert_each_item_has_one_final_record(rig.engine, job_id)
    after = requests_by_prompt(loopback)
    finished_first = {o.item.prompt for o in done + rest}
    assert all(after[p] == before[p] == 1 for p in finished_first)
    assert all(after[p] == 2 for p in hung_prompts)


async def test_an_abandoned_run_gives_its_items_back(rig: Rig, loopback: LoopbackServer) -> None:
    """A consumer that stops iterating (Ctrl-C, a closed page) leaves nothing claimed."""
    n, concurrency = 30, 4
    job_id = await rig.batches.create_job([f"abandon {i}" for i in range(n)], [OPENAI])
    done: list[ItemOutcome] = []

    async def consume() -> None:
        async for outcome in rig.batches.run_job(job_id, concurrency=concurrency):
            done.append(outcome)
            if len(done) == 5:  # from now on every call hangs on the server
                loopback.script(*[Fault("delay", delay_s=60)] * concurrency, path=CHAT)

    consumer = asyncio.ensure_future(consume())
    await wait_until(lambda: loopback.in_flight == concurrency)
    consumer.cancel()  # the person pressed Ctrl-C, or closed the page
    with pytest.raises(asyncio.CancelledError):
        await consumer

    counts = await rig.batches.counts(job_id)
    assert counts.claimed == 0
    assert (counts.succeeded, counts.pending) == (len(done), n - len(done))
    assert (await rig.batches.job(job_id))["status"] == "running"  # interrupted, not done
    abandoned = read(rig.engine, select(RawCall).where(RawCall.status == "cancelled"))
    assert len(abandoned) == concurrency

    # Another run (a new worker) takes everything left at once: no lease to wait out.
    rest = await run_all(rig.batches, job_id, concurrency=concurrency)
    assert len(rest) == n - len(done)
    assert_each_item_has_one_final_record(rig.engine, job_id)
    assert (await rig.batches.job(job_id))["status"] == "completed"


async def test_cancel_from_another_service_stops_the_run(
    rig: Rig, engine: Engine, loopback: LoopbackServer
) -> None:
    """A cancel issued elsewhere (another dashboard session) ends the run; it stays cancelled."""
    loopback.delay_s = 0.02
    job_id = await rig.batches.create_job([f"remote cancel {i}" for i in range(200)], [OPENAI])
    other = make_rig(engine, loopback.openai_base_url)
    seen = 0
    async for _ in rig.batches.run_job(job_id, concurrency=4):
        seen += 1
        if seen == 5:
            await other.batches.cancel(job_id)
    counts = await rig.batches.counts(job_id)
    assert counts.open == 0
    assert counts.cancelled > 100
    assert (await rig.batches.job(job_id))["status"] == "cancelled"


async def test_identical_prompts_share_one_call_when_the_job_asks_for_it(
    rig: Rig, loopback: LoopbackServer
) -> None:
    loopback.delay_s = 0.05
    job_id = await rig.batches.create_job(["same", "same", "same", "other"], [OPENAI], dedup=True)
    outcomes = await run_all(rig.batches, job_id, concurrency=4)
    assert loopback.count(CHAT) == 2
    assert sorted(o.result.deduplicated for o in outcomes) == [False, False, True, True]
    items = items_of(rig.engine, job_id)
    assert all(item.status == "succeeded" for item in items)
    assert len({item.call_id for item in items[:3]}) == 1
    assert table_count(rig.engine, RawCall) == 2


async def test_samples_never_share_a_call_even_when_the_job_asks_for_dedup(
    rig: Rig, loopback: LoopbackServer
) -> None:
    """n_samples > 1 asks for independent answers: identical prompts are each sent."""
    loopback.delay_s = 0.05  # identical requests overlap in flight
    job_id = await rig.batches.create_job(["same", "same"], [OPENAI], n_samples=3, dedup=True)
    outcomes = await run_all(rig.batches, job_id, concurrency=6)
    assert loopback.count(CHAT) == 6
    assert requests_by_prompt(loopback) == {"same": 6}
    assert len(outcomes) == 6
    assert all(o.status == "succeeded" and not o.result.deduplicated for o in outcomes)
    items = items_of(rig.engine, job_id)
    assert sorted(item.sample_index for item in items) == [0, 0, 1, 1, 2, 2]
    assert len({item.call_id for item in items}) == 6
    assert table_count(rig.engine, RawCall) == 6
    assert_each_item_has_one_final_record(rig.engine, job_id)


async def test_an_unknown_deployment_is_asked_once_per_batch(
    engine: Engine, loopback: LoopbackServer
) -> None:
    """A 404 is remembered: the other items fail at once, each with its own failed record."""
    settings = Settings(_env_file=None)
    inference = InferenceService(
        CallRecorder(engine),
        providers=lambda _id: create(
            "azure", settings, api_key="k", base_url=loopback.url, timeout_s=60
        ),
        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01),
    )
    batches = BatchService(engine, inference)
    n = 20
    try:
        job_id = await batches.create_job(
            [f"deploy {i}" for i in range(n)], [Target("azure", "no-such-deployment")]
        )
        outcomes = await run_all(batches, job_id, concurrency=8)
    finally:
        await inference.aclose()
    assert len(loopback.requests) == 1
    assert loopback.requests[0].path == "/openai/deployments/no-such-deployment/chat/completions"
    assert len(outcomes) == n and all(o.status == "failed" for o in outcomes)
    assert all("no-such-deployment" in str(o.result.error) for o in outcomes)

    calls = read(engine, select(RawCall).order_by(RawCall.id))
    assert len(calls) == n and {c.status for c in calls} == {"failed"}
    [asked] = [c for c in calls if not c.error_json.get("remembered")]
    remembered = [c for c in calls if c.error_json.get("remembered")]
    assert asked.error_json["status_code"] == 404 and len(remembered) == n - 1
    assert {c.error_json["message"] for c in calls} == {asked.error_json["message"]}
    assert {c.error_json["type"] for c in calls} == {"not_found"}
    assert all("remembered as unknown" in c.error_json["detail"] for c in remembered)
    assert all(c.metadata_json["final_attempt"] for c in calls)  # never retried
    assert_each_item_has_one_final_record(engine, job_id)
    counts = await batches.counts(job_id)
    assert (counts.failed, counts.succeeded, counts.open) == (n, 0, 0)


class FlakyRecorder(CallRecorder):
    """Fails to record the first `failures` successful calls, as if the database were gone."""

    def __init__(self, engine: Engine, failures: int) -> None:
        super().__init__(engine)
        self.failures = failures
        self.lost: list[str] = []

    async def record(self, call, **kwargs):
        if call.status == "success" and self.failures > 0:
            self.failures -= 1
            self.lost.append(call.request_json["messages"][-1]["content"])
            raise RecordingError("could not record the call: database is gone")
        return await super().record(call, **kwargs)


async def test_a_call_that_could_not_be_recorded_is_made_again(
    engine: Engine, loopback: LoopbackServer
) -> None:
    rig = make_rig(engine, loopback.openai_base_url)
    recorder = FlakyRecorder(engine, failures=3)
    rig.inference.recorder = recorder
    n = 20
    try:
        job_id = await rig.batches.create_job([f"flaky {i}" for i in range(n)], [OPENAI])
        outcomes = await run_all(rig.batches, job_id, concurrency=4)
    finally:
        await rig.inference.aclose()
    assert len(recorder.lost) == 3
    assert sorted(o.item.prompt for o in outcomes) == sorted(f"flaky {i}" for i in range(n))
    assert all(o.status == "succeeded" for o in outcomes)
    assert_each_item_has_one_final_record(engine, job_id)
    # an item whose call was lost is made again; its retry may be lost too (the first
    # three successful calls are, whichever items they belong to)
    lost = Counter(recorder.lost)
    calls = requests_by_prompt(loopback)
    assert {p: calls[p] for p in lost} == {p: 1 + k for p, k in lost.items()}
    assert sum(calls.values()) == n + 3
    items = items_of(engine, job_id)
    assert {i.prompt: i.claims for i in items if i.claims > 1} == {
        p: 1 + k for p, k in lost.items()
    }
    assert (await rig.batches.job(job_id))["status"] == "completed"


async def test_a_run_that_stops_for_a_cancel_ends_with_the_job_cancelled(rig: Rig) -> None:
    """A run that notices the cancel and stops by itself must not beat the cancel's own
    write: when its outcomes end, the job already reads cancelled (so the dashboard offers
    it for resuming), and the cancel counts the pending items it skipped."""
    n = 300
    job_id = await rig.batches.create_job([f"stop me {i}" for i in range(n)], [MOCK])
    outcomes = rig.batches.run_job(job_id, concurrency=1)
    done = [await anext(outcomes) for _ in range(3)]
    cancelling = asyncio.ensure_future(rig.batches.cancel(job_id))
    done += await asyncio.wait_for(drain(outcomes), TIMEOUT_S)
    status_when_the_run_ended = (await rig.batches.job(job_id))["status"]
    skipped = await cancelling
    assert status_when_the_run_ended == "cancelled"
    counts = await rig.batches.counts(job_id)
    assert counts.open == 0
    # A call that finished while the run was being stopped is recorded (and counted)
    # though its outcome was not handed out any more.
    assert len(done) <= counts.succeeded <= len(done) + 1
    assert counts.cancelled == n - counts.succeeded
    # The run held at most 2 x concurrency items; every other one was pending.
    assert counts.cancelled - 2 <= skipped <= counts.cancelled
    jobs = await rig.batches.list_jobs(limit=10)
    assert [j["status"] for j in jobs if j["id"] == job_id] == ["cancelled"]


async def test_cancel_leaves_a_finished_job_alone(rig: Rig) -> None:
    job_id = await rig.batches.create_job(["done already"], [MOCK])
    await run_all(rig.batches, job_id)
    assert await rig.batches.cancel(job_id) == 0
    assert (await rig.batches.job(job_id))["status"] == "completed"
    with pytest.raises(LookupError, match="no batch job with id 999"):
        await rig.batches.cancel(999)


async def test_a_cancelled_job_does_not_run_until_reopened(
    rig: Rig, loopback: LoopbackServer
) -> None:
    job_id = await rig.batches.create_job(["wait", "for", "reopen"], [OPENAI])
    assert await rig.batches.cancel(job_id) == 3
    assert await run_all(rig.batches, job_id) == []
    assert loopback.count(CHAT) == 0
    assert await rig.batches.reopen(job_id) == 3
    assert len(await run_all(rig.batches, job_id)) == 3
    assert (await rig.batches.job(job_id))["status"] == "completed"


# --- several workers and leases ------------------------------------------------------------


@pytest.mark.postgres
async def test_several_workers_drain_one_job_on_postgres(
    pg_db_url: str, loopback: LoopbackServer
) -> None:
    engine = get_engine(pg_db_url)
    loopback.delay_s = 0.01
    a = make_rig(engine, loopback.openai_base_url)
    b = make_rig(engine, loopback.openai_base_url)
    n = 240
    try:
        job_id = await a.batches.create_job([f"shared {i}" for i in range(n)], [OPENAI])
        # Default leases (60 s): a worker that runs out of work must not sit out a whole
        # lease waiting on items the other worker is still finishing.
        first, second = await asyncio.wait_for(
            asyncio.gather(
                drain(a.batches.run_job(job_id, concurrency=4, worker="worker-a")),
                drain(b.batches.run_job(job_id, concurrency=4, worker="worker-b")),
            ),
            30,
        )
    finally:
        await a.inference.aclose()
        await b.inference.aclose()
    assert len(first) > 10 and len(second) > 10
    assert len(first) + len(second) == n
    assert not {o.item.id for o in first} & {o.item.id for o in second}
    assert loopback.count(CHAT) == n  # no item was ever called twice
    assert set(requests_by_prompt(loopback).values()) == {1}
    assert_each_item_has_one_final_record(engine, job_id)
    workers = Counter(c.metadata_json["worker"] for c in read(engine, select(RawCall)))
    assert workers == {"worker-a": len(first), "worker-b": len(second)}
    counts = await a.batches.counts(job_id)
    assert (counts.succeeded, counts.open) == (n, 0)


def _workers_seen(engine: Engine, job_id: int) -> set[str]:
    """Workers holding an item of the job now, or that recorded a call for it."""
    holding = read(
        engine,
        select(BatchJobItem.claimed_by)
        .where(BatchJobItem.job_id == job_id, BatchJobItem.claimed_by.is_not(None))
        .distinct(),
    )
    recorded = {(c.metadata_json or {}).get("worker") for c in read(engine, select(RawCall))}
    return (set(holding) | recorded) - {None}


@pytest.mark.postgres
async def test_several_worker_processes_drain_one_job_on_postgres(
    pg_db_url: str, loopback: LoopbackServer, tmp_path: Path
) -> None:
    """`study-query-llm batch resume ID` in three processes at once: each item is called and
    recorded exactly once, and every process takes a share."""
    n, processes = 150, 3
    engine = get_engine(pg_db_url)
    rig = make_rig(engine, loopback.openai_base_url)
    try:
        job_id = await rig.batches.create_job([f"process {i}" for i in range(n)], [OPENAI])
    finally:
        await rig.inference.aclose()
    # Slow answers until every process has claimed items, so none can finish the job alone
    # however long the others take to start (one alone would need n / 2 x 2 s).
    loopback.delay_s = 2.0
    env = {
        **os.environ,
        "DATABASE_URL": pg_db_url,
        "OPENAI_API_KEY": "k",
        "OPENAI_BASE_URL": loopback.openai_base_url,
    }
    command = [CLI, "batch", "resume", str(job_id), "--no-progress", "--concurrency", "2"]
    procs = [
        await asyncio.create_subprocess_exec(
            *command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(processes)
    ]
    try:
        await wait_until(lambda: len(_workers_seen(engine, job_id)) == processes, within=TIMEOUT_S)
        loopback.delay_s = 0.0
        results = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), TIMEOUT_S
        )
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for proc, (out_bytes, err_bytes) in zip(procs, results, strict=True):
        out, err = out_bytes.decode(), err_bytes.decode()
        assert proc.returncode == 0, err
        assert "Traceback" not in out + err
        match = SUMMARY.search(out)
        assert match and tuple(int(g) for g in match.groups()) == (n, 0, 0, 0, n), out

    assert loopback.count(CHAT) == n  # no item was called twice
    assert set(requests_by_prompt(loopback).values()) == {1}
    assert_each_item_has_one_final_record(engine, job_id)
    assert {item.status for item in items_of(engine, job_id)} == {"succeeded"}
    calls = read(engine, select(RawCall))
    assert len(calls) == n and {c.status for c in calls} == {"success"}
    # Worker ids are host:pid:suffix; each process recorded some of the calls.
    shares = Counter(c.metadata_json["worker"].rsplit(":", 2)[1] for c in calls)
    assert set(shares) == {str(p.pid) for p in procs}
    assert sum(shares.values()) == n
    assert (await rig.batches.job(job_id))["status"] == "completed"


async def test_dead_workers_items_are_taken_over_after_their_lease(
    rig: Rig, loopback: LoopbackServer
) -> None:
    job_id = await rig.batches.create_job([f"lease {i}" for i in range(10)], [OPENAI])
    taken = await asyncio.to_thread(
        run_write,
        rig.engine,
        lambda uow: JobRepository(uow.session).claim(job_id, "dead", limit=3, lease_s=1.0),
    )
    assert [item.position for item in taken] == [0, 1, 2]

    outcomes = await run_all(rig.batches, job_id, concurrency=2, worker="alive", lease_s=5)
    assert len(outcomes) == 10
    items = items_of(rig.engine, job_id)
    assert all(item.status == "succeeded" for item in items)
    assert [item.claims for item in items[:3]] == [2, 2, 2]
    assert all(item.claims == 1 for item in items[3:])
    assert all(item.claimed_by is None for item in items)
    assert loopback.count(CHAT) == 10
    assert_each_item_has_one_final_record(rig.engine, job_id)
    assert (await rig.batches.job(job_id))["status"] == "completed"


async def test_items_finished_together_first_outcome_wins(rig: Rig) -> None:
    """`finish_many` (the recorder finishes a transaction's items with it): an open item
    takes its first outcome, a second outcome for it and an item already finished lose,
    and an item cancelled before any call finished it can still take its answer."""
    job_id = await rig.batches.create_job([f"together {i}" for i in range(4)], [OPENAI])

    def setup(uow: UnitOfWork) -> tuple[list[int], list[int]]:
        jobs = JobRepository(uow.session)
        claimed = [item.id for item in jobs.claim(job_id, "w", limit=3, lease_s=60)]
        jobs.cancel_open(job_id)  # the fourth item, never claimed
        call_ids = uow.calls.add_many(
            [
                NewCall(provider="openai", model=OPENAI.model, modality="chat",
                        status="success", request_json={"n": n})
                for n in range(6)
            ]
        )  # fmt: skip
        assert jobs.finish(claimed[0], status="succeeded", call_id=call_ids[0])
        return claimed, call_ids

    (first, second, third), call_ids = await asyncio.to_thread(run_write, rig.engine, setup)
    fourth = next(item.id for item in items_of(rig.engine, job_id) if item.status == "cancelled")
    won = await asyncio.to_thread(
        run_write,
        rig.engine,
        lambda uow: JobRepository(uow.session).finish_many(
            [
                (second, "succeeded", call_ids[1]),
                (first, "succeeded", call_ids[2]),  # finished before
                (second, "failed", call_ids[3]),  # a later outcome for the same item
                (fourth, "succeeded", call_ids[4]),  # cancelled without an answer
                (third, "failed", call_ids[5]),
            ]
        ),
    )

    assert won == [True, False, False, True, True]
    items = {item.id: item for item in items_of(rig.engine, job_id)}
    assert [(items[i].status, items[i].call_id) for i in (first, second, third, fourth)] == [
        ("succeeded", call_ids[0]),
        ("succeeded", call_ids[1]),
        ("failed", call_ids[5]),
        ("succeeded", call_ids[4]),
    ]
    assert all(item.claimed_by is None and item.lease_expires_at is None for item in items.values())


async def test_lease_renewal_skips_items_being_finished_instead_of_waiting(rig: Rig) -> None:
    """Renewing leases never waits for a row another transaction holds (PostgreSQL: the
    recorder finishing that item), so it cannot deadlock with it; the rest are renewed."""
    job_id = await rig.batches.create_job([f"renew {i}" for i in range(4)], [OPENAI])
    taken = await asyncio.to_thread(
        run_write,
        rig.engine,
        lambda uow: JobRepository(uow.session).claim(job_id, "w", limit=4, lease_s=1.0),
    )
    ids = [item.id for item in taken]
    postgres = rig.engine.dialect.name == "postgresql"
    with UnitOfWork(rig.engine, write=True) as finishing:
        if postgres:  # another transaction holds the first item's row
            finishing.session.execute(
                select(BatchJobItem.id).where(BatchJobItem.id == ids[0]).with_for_update()
            )
        else:
            finishing.session.rollback()  # SQLite: one writer at a time anyway
        # A renewal that waited for the held row would never return while it is held:
        # give up after 60 s (a failure, not a hung suite) and release the row.
        renewed = await asyncio.wait_for(
            asyncio.to_thread(
                run_write,
                rig.engine,
                lambda uow: JobRepository(uow.session).renew("w", ids, lease_s=600),
            ),
            timeout=60,
        )
        assert renewed == (3 if postgres else 4)
        other = await asyncio.to_thread(
            run_write,
            rig.engine,
            lambda uow: JobRepository(uow.session).renew("someone else", ids, lease_s=600),
        )
        assert other == 0
    items = {item.id: item for item in items_of(rig.engine, job_id)}
    soon = datetime.now(UTC) + timedelta(seconds=300)  # the first lease ran for 1 s
    far = [i for i in ids if items[i].lease_expires_at > soon]
    assert far == (ids[1:] if postgres else ids)
