"""Provider health: reachability, a recorded tiny request, breaker state and failure rates.

Checked through the library (`check_health`, on SQLite and PostgreSQL) and through
`study-query-llm providers check`, against a live loopback server and a dead address.
"""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from sqlalchemy import select

from study_query_llm.cli import main
from study_query_llm.config import Settings
from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.models_v2 import RawCall
from study_query_llm.providers.health import check_health
from study_query_llm.services.context import open_services
from study_query_llm.testing.server import Fault, LoopbackServer

MODEL = "gpt-4o-mini"


def dead_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def groups_json(name: str, alive: LoopbackServer) -> str:
    return json.dumps(
        {
            name: {
                "strategy": "failover",
                "breaker": {"failures": 1, "cooldown_s": 300},
                "targets": [
                    {"provider": "openai", "model": MODEL, "name": "dead", "base_url": dead_url()},
                    {"provider": "openai", "model": MODEL, "name": "alive",
                     "base_url": alive.openai_base_url},
                ],
            }
        }
    )  # fmt: skip


async def test_health_of_every_target_with_a_recorded_tiny_request(db_url, loopback):
    name = f"health-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        _env_file=None,
        database_url=db_url,
        openai_api_key="test-key",
        openai_base_url=loopback.openai_base_url,
        provider_groups=groups_json(name, loopback),
        mock_latency_ms=0,
    )
    async with open_services(settings) as services:
        loopback.script(Fault(status=503), path="/chat/completions")
        await services.inference.run("warm-up", provider="openai")  # one failure on record
        rows = {r.label: r for r in await check_health(services)}
        again = {r.label: r for r in await check_health(services, request=False)}
        with UnitOfWork(services.engine) as uow:
            everything = list(uow.session.scalars(select(RawCall)))
            checks = list(
                uow.session.scalars(
                    select(RawCall).where(
                        RawCall.metadata_json["purpose"].as_string() == "health_check"
                    )
                )
            )

    openai = rows[f"openai ({MODEL})"]
    assert openai.reachable and openai.models_listed and openai.listing_ms is not None
    assert openai.request_ms is not None and openai.call_id is not None
    # The warm-up retried past the 503 and the check succeeded; the group's targets are
    # openai too, so their calls (the dead target's failed tries included) count as well.
    openai_rows = [r for r in everything if r.provider == "openai"]
    assert openai.recent_calls == len(openai_rows) >= 3
    assert openai.recent_failures == sum(r.status != "success" for r in openai_rows) >= 1

    dead = rows[f"group:{name} → dead"]
    assert dead.reachable is False and dead.request_ms is None
    assert "listing" in (dead.error or "")
    assert dead.breaker and dead.breaker["state"] == "open"
    assert "connection" in dead.breaker["last_error"]

    alive = rows[f"group:{name} → alive"]
    assert alive.reachable and alive.request_ms is not None
    assert alive.breaker and alive.breaker["state"] == "closed"
    assert (alive.recent_calls, alive.recent_failures) == (1, 0)

    group_row = rows[f"group:{name} (auto)"]
    assert group_row.reachable and group_row.breaker == {
        "strategy": "failover",
        "mode": "immediate",
    }

    mock = rows["mock (mock-small)"]
    assert mock.reachable and mock.request_ms is not None

    # Every tiny request was recorded; a pinned request to the open breaker made no call.
    # Group calls are recorded under their targets' provider, the group in their routing.
    assert {c.provider for c in checks} <= {"openai", f"group:{name}", "mock"}
    assert {"openai", "mock"} <= {c.provider for c in checks}
    dead_check = next(
        c
        for c in checks
        if c.error_json and (c.error_json.get("routing") or {}).get("group") == name
    )
    assert dead_check.error_json["type"] in ("group_exhausted", "no_healthy_target")
    assert again[f"openai ({MODEL})"].request_ms is None  # request=False sends nothing
    assert again[f"group:{name} → dead"].breaker["state"] == "open"


def test_providers_check_prints_json_and_fails_when_a_target_is_unreachable(
    tmp_path, monkeypatch, capsys, loopback
):
    monkeypatch.chdir(tmp_path)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("PROVIDER_GROUPS", groups_json(name, loopback))
    assert main(["providers", "check", "--json", "-p", f"group:{name}"]) == 1
    payload = json.loads(capsys.readouterr().out)
    by_target = {row["target"]: row for row in payload["targets"]}
    assert by_target["dead"]["reachable"] is False
    assert by_target["dead"]["breaker"]["state"] == "open"
    assert by_target["alive"]["reachable"] is True
    assert by_target["alive"]["request_ms"] is not None
    assert "test-key" not in json.dumps(payload)

    assert main(["providers", "check", "--no-request", "-p", "mock"]) == 0
    out = capsys.readouterr().out
    assert "mock (mock-small)" in out and "yes" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["providers", "check", "-p", "group:nope"], "unknown provider group 'nope'"),
        (["providers", "check", "--window-minutes", "0"], "--window-minutes and --timeout"),
    ],
)
def test_providers_check_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
