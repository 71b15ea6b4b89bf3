"""Provider groups through InferenceService and BatchService, configured as `group:NAME`.

The group is built by the registry from PROVIDER_GROUPS (as a user configures it), calls
go over real HTTP to loopback servers, and the record is read back from `raw_calls` on
SQLite and PostgreSQL: which target served each call and which were tried.
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from study_query_llm.config import Settings
from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.models_v2 import RawCall
from study_query_llm.services.context import open_services
from study_query_llm.services.inference import NO_RETRY, RetryPolicy
from study_query_llm.services.jobs import Target
from study_query_llm.testing.server import Fault, LoopbackServer

MODEL = "gpt-4o-mini"
CHAT = "/chat/completions"


def dead_url() -> str:
    """A loopback address nobody listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def group_settings(db_url: str, name: str, **group: Any) -> Settings:
    return Settings(
        _env_file=None,
        database_url=db_url,
        openai_api_key="test-key",
        provider_groups=json.dumps({name: group}),
    )


def unique(prefix: str) -> str:
    """Group state is shared per name within a process: each test gets its own group."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def rows(engine) -> list[RawCall]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.scalars(select(RawCall).order_by(RawCall.id)))


def target(name: str, base_url: str, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": MODEL, "name": name, "base_url": base_url, **extra}


async def test_raw_calls_record_the_target_that_served_and_the_ones_tried(db_url):
    with LoopbackServer() as a, LoopbackServer() as b:
        name = unique("pair")
        settings = group_settings(
            db_url, name, targets=[target("a", a.openai_base_url), target("b", b.openai_base_url)]
        )
        async with open_services(settings, retry=NO_RETRY) as services:
            a.script(Fault(status=503))
            served = await services.inference.run("Where is Paris?", provider=f"group:{name}")
            a.script(Fault(status=400))
            refused = await services.inference.run("Where is Rome?", provider=f"group:{name}")
            a.script(Fault(status=503))
            b.script(Fault(status=503))
            exhausted = await services.inference.run("Where is Oslo?", provider=f"group:{name}")
        assert served.ok and not refused.ok and not exhausted.ok
        recorded = rows(services.engine)

    # One row per provider call: a's 503, b's answer; a's 400; a's 503 then b's 503.
    assert [(r.status, r.metadata_json["routing"]["target"]) for r in recorded[:2]] == [
        ("failed", "a"),
        ("success", "b"),
    ]
    first_try, ok, bad, exhausted_a, failed = recorded
    assert first_try.provider == "openai" and first_try.model == MODEL
    assert first_try.error_json["status_code"] == 503 and first_try.error_json["failed_over"]
    assert first_try.metadata_json["routing"]["group"] == name
    assert exhausted_a.status == "failed" and exhausted_a.error_json["status_code"] == 503
    assert served.call_id == ok.id

    # The answer is recorded under the provider that gave it; the group is in the routing.
    assert (ok.provider, ok.model, ok.status) == ("openai", MODEL, "success")
    routing = ok.metadata_json["routing"]
    assert routing["group"] == name and routing["strategy"] == "failover"
    assert routing["target"] == "b"
    assert [(t["target"], t["outcome"]) for t in routing["tried"]] == [
        ("a", "failed"),
        ("b", "success"),
    ]
    assert routing["tried"][0]["status_code"] == 503
    assert ok.metadata_json["target_provider"] == "openai"

    assert bad.status == "failed" and bad.error_json["type"] == "bad_request"
    assert bad.error_json["transient"] is False
    assert [t["target"] for t in bad.error_json["routing"]["tried"]] == ["a"]

    assert (failed.provider, failed.model) == ("openai", MODEL)  # b, the last target tried
    assert failed.error_json["type"] == "group_exhausted"
    assert [t["target"] for t in failed.error_json["routing"]["tried"]] == ["a", "b"]
    assert failed.error_json["routing"]["last_target"] == "b"


async def test_streaming_through_a_group_is_recorded_with_its_routing(tmp_path):
    with LoopbackServer() as a, LoopbackServer() as b:
        name = unique("stream")
        settings = group_settings(
            f"sqlite:///{tmp_path / 's.db'}",
            name,
            strategy="round_robin",
            targets=[target("a", a.openai_base_url), target("b", b.openai_base_url)],
        )
        async with open_services(settings) as services:
            a.script(Fault(status=503))
            items = [
                item
                async for item in services.inference.stream(
                    "Name three colours", provider=f"group:{name}"
                )
            ]
        *failed_over, row = rows(services.engine)  # a's 503 first, if a was tried first
    assert [r.status for r in failed_over] == ["failed"] * len(failed_over) and len(failed_over) < 2
    assert items[-1].ok
    assert row.status == "success" and row.provider == "openai"
    assert row.metadata_json["routing"]["target"] in ("a", "b")
    assert row.metadata_json["streamed"] is True


async def test_a_batch_through_a_group_with_a_dead_target_loses_no_item(db_url):
    with LoopbackServer() as alive:
        name = unique("dead")
        settings = group_settings(
            db_url,
            name,
            strategy="round_robin",
            breaker={"failures": 2, "cooldown_s": 600},
            targets=[target("dead", dead_url()), target("alive", alive.openai_base_url)],
        )
        prompts = [f"prompt number {i}" for i in range(40)]
        async with open_services(settings, retry=RetryPolicy(max_attempts=2)) as services:
            job_id = await services.batches.create_job(
                prompts, [Target(f"group:{name}", "auto")], name="through a group"
            )
            outcomes = [o async for o in services.batches.run_job(job_id, concurrency=4)]
            counts = await services.batches.counts(job_id)
            status = {
                row["target"]: row for row in services.inference.provider(f"group:{name}").status()
            }
        records = rows(services.engine)

    assert (counts.succeeded, counts.failed, counts.open) == (40, 0, 0)
    assert sorted(o.item.position for o in outcomes) == list(range(40))
    answers = [r for r in records if r.status == "success"]
    assert len(answers) == 40
    assert {r.metadata_json["routing"]["target"] for r in answers} == {"alive"}
    assert alive.count(CHAT) == 40
    # The dead target was tried until its breaker opened, then left alone; each try is a
    # failed call of its own, next to the answer the alive target gave instead.
    tried_dead = [r for r in answers if len(r.metadata_json["routing"]["tried"]) == 2]
    assert 1 <= len(tried_dead) <= 4 + 2  # at most the calls in flight when it opened
    dead_rows = [r for r in records if r.status != "success"]
    assert len(dead_rows) == len(tried_dead)
    assert {r.metadata_json["routing"]["target"] for r in dead_rows} == {"dead"}
    assert status["dead"]["breaker"]["state"] == "open"
    assert "connection" in status["dead"]["breaker"]["last_error"]


@pytest.mark.slow
async def test_rate_limit_budgets_keep_a_batch_under_the_servers_429_threshold(tmp_path):
    prompts = [f"prompt number {i}" for i in range(10)]
    with LoopbackServer() as server:
        server.set_request_limit(6, window_s=1.0)  # the provider's limit: 6 per second
        # Without a budget, a concurrent batch runs into the limit.
        free = unique("free")
        settings = group_settings(
            f"sqlite:///{tmp_path / 'free.db'}", free, targets=[target("s", server.openai_base_url)]
        )
        async with open_services(settings) as services:
            job = await services.batches.create_job(prompts, [Target(f"group:{free}", "auto")])
            [o async for o in services.batches.run_job(job, concurrency=8)]
        assert server.rate_limited > 0

        server.reset()
        server.set_request_limit(6, window_s=1.0)
        # With 120 requests per minute (2 per second, no burst) it never does: at most
        # 3 fall in any second, so even calls bunched by a busy machine stay under 6.
        paced = unique("paced")
        settings = group_settings(
            f"sqlite:///{tmp_path / 'paced.db'}",
            paced,
            targets=[target("s", server.openai_base_url, rpm=120)],
        )
        async with open_services(settings) as services:
            job = await services.batches.create_job(prompts, [Target(f"group:{paced}", "auto")])
            [o async for o in services.batches.run_job(job, concurrency=8)]
            counts = await services.batches.counts(job)
        assert server.rate_limited == 0
        assert counts.succeeded == 10
        assert server.count(CHAT) == 10
        records = rows(services.engine)
    assert len(records) == 10 and {r.status for r in records} == {"success"}
    assert any(r.metadata_json["routing"].get("waited_s") for r in records)
