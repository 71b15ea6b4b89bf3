"""Provider groups over real HTTP: two loopback servers with different delays and faults.

Failover, strategy distributions, least-busy and latency preferences, and the circuit
breaker's whole cycle, each seen from the servers' side (which server got which request).
Breaker time runs on a fake clock, so no test waits for a cooldown.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from study_query_llm.config import Settings
from study_query_llm.providers import ProviderResponse, create
from study_query_llm.providers.group import (
    GroupConfig,
    GroupExhaustedError,
    GroupState,
    GroupTargetError,
    NoHealthyTargetError,
    ProviderGroup,
    TargetConfig,
)
from study_query_llm.testing.server import Fault, LoopbackServer

CHAT = "/chat/completions"
MODEL = "gpt-4o-mini"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    with LoopbackServer() as a, LoopbackServer() as b:
        yield a, b


def target(name: str, server: LoopbackServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": MODEL, "name": name,
            "base_url": server.openai_base_url, **extra}  # fmt: skip


def build_target(config: TargetConfig, timeout_s: float = 10.0):
    return create(
        config.provider,
        Settings(_env_file=None),
        api_key="test-key",
        base_url=config.base_url,
        model=config.model,
        timeout_s=config.timeout_s or timeout_s,
    )


def http_group(
    servers: tuple[LoopbackServer, LoopbackServer],
    *,
    clock: FakeClock | None = None,
    seed: int = 3,
    targets: list[dict[str, Any]] | None = None,
    **config: Any,
) -> ProviderGroup:
    a, b = servers
    kwargs: dict[str, Any] = {}
    if clock is not None:
        kwargs = {"clock": clock, "sleep": clock.sleep}
    return ProviderGroup(
        GroupConfig(name="pair", targets=targets or [target("a", a), target("b", b)], **config),
        factory=build_target,
        state=GroupState(),
        rng=random.Random(seed),
        **kwargs,
    )


def served(response: ProviderResponse) -> str:
    return response.metadata["routing"]["target"]


async def many(group: ProviderGroup, count: int, concurrency: int = 25) -> Counter[str]:
    limit = asyncio.Semaphore(concurrency)

    async def one(index: int) -> str:
        async with limit:
            return served(await group.complete(f"question {index}"))

    return Counter(await asyncio.gather(*(one(i) for i in range(count))))


# --- failover -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Fault(status=503), "server_error"),
        (Fault(status=500), "server_error"),
        (Fault(status=429, retry_after=0), "rate_limited"),
        (Fault(kind="reset"), "connection"),
        (Fault(kind="malformed"), "malformed_response"),
        (Fault(kind="timeout", hang_s=5), "timeout"),
    ],
    ids=["503", "500", "429", "reset", "malformed", "timeout"],
)
async def test_failover_moves_to_the_next_target_on_a_transient_failure(servers, fault, kind):
    a, b = servers
    group = http_group(servers, targets=[target("a", a, timeout_s=0.5), target("b", b)])
    a.script(fault)
    try:
        response = await group.complete("Where is Paris?")
    finally:
        await group.aclose()
    assert "Paris" in response.text
    assert served(response) == "b"
    tried = response.metadata["routing"]["tried"]
    assert [t["target"] for t in tried] == ["a", "b"]
    assert tried[0]["error"] == kind and tried[0]["transient"] is True
    assert (a.count(CHAT), b.count(CHAT)) == (1, 1)


async def test_failover_does_not_move_on_a_permanent_400(servers):
    a, b = servers
    group = http_group(servers)
    a.script(Fault(status=400))
    with pytest.raises(GroupTargetError) as info:
        await group.complete("Where is Paris?")
    await group.aclose()
    assert info.value.status_code == 400 and info.value.kind == "bad_request"
    assert not info.value.transient
    assert b.count(CHAT) == 0  # the other target was never asked
    assert info.value.to_json()["routing"]["tried"][0]["target"] == "a"


async def test_when_both_fail_the_error_says_so_and_is_worth_retrying(servers):
    a, b = servers
    group = http_group(servers)
    a.script(Fault(status=503))
    b.script(Fault(status=429, retry_after=7))
    with pytest.raises(GroupExhaustedError) as info:
        await group.complete("hello")
    await group.aclose()
    assert info.value.transient and info.value.retry_after == pytest.approx(7)
    assert [t["status_code"] for t in info.value.routing["tried"]] == [503, 429]


async def test_streaming_fails_over_before_any_text_is_shown(servers):
    a, _b = servers
    group = http_group(servers)
    a.script(Fault(status=503))
    items = [item async for item in group.stream("Name three colours")]
    await group.aclose()
    final = items[-1]
    assert isinstance(final, ProviderResponse) and served(final) == "b"
    assert "".join(i for i in items if isinstance(i, str)) == final.text
    assert "colours" in final.text


# --- strategies -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_round_robin_over_1000_calls_is_even_as_the_servers_saw_it(servers):
    a, b = servers
    group = http_group(servers, strategy="round_robin")
    counts = await many(group, 1000)
    await group.aclose()
    assert counts == {"a": 500, "b": 500}
    assert (a.count(CHAT), b.count(CHAT)) == (500, 500)


@pytest.mark.slow
async def test_weighted_over_1000_calls_follows_the_weights(servers):
    a, b = servers
    group = http_group(
        servers, strategy="weighted", targets=[target("a", a, weight=1), target("b", b, weight=3)]
    )
    counts = await many(group, 1000)
    await group.aclose()
    # Expected 250 / 750 (seeded); the standard deviation is ~14, so ±60 is > 4 sigma.
    assert abs(a.count(CHAT) - 250) <= 60
    assert a.count(CHAT) + b.count(CHAT) == 1000
    assert counts["a"] == a.count(CHAT)


async def test_least_busy_prefers_the_idle_server(servers):
    a, _b = servers
    group = http_group(servers, strategy="least_busy")
    a.script(Fault(kind="delay", delay_s=30))  # the next request to a is held
    held = asyncio.create_task(group.complete("slow one", model="a"))
    assert await asyncio.to_thread(a.wait_for_requests, 1, 10.0)
    picks = Counter([served(await group.complete(f"q{i}")) for i in range(10)])
    assert picks == {"b": 10}  # a has one request in flight, b none
    a.reset()  # release the held request; it completes normally
    assert served(await held) == "a"
    await group.aclose()


async def test_latency_prefers_the_fast_server_and_still_explores(servers):
    a, _b = servers
    a.delay_s = 0.15
    group = http_group(servers, strategy="latency", explore=0.1, seed=11)
    picks = Counter([served(await group.complete(f"q{i}")) for i in range(40)])
    await group.aclose()
    assert picks["b"] >= 32  # expected ~38: every exploit, half the explorations
    assert picks["a"] >= 1  # measured at least once (untried targets go first)
    rows = {row["target"]: row for row in group.status()}
    assert rows["a"]["latency_ms"] > rows["b"]["latency_ms"]


# --- circuit breaker ------------------------------------------------------------------------


async def test_breaker_opens_blocks_half_opens_and_closes(servers):
    a, _b = servers
    clock = FakeClock()
    group = http_group(servers, clock=clock, breaker={"failures": 3, "cooldown_s": 30})
    a.script(*[Fault(status=503)] * 3)
    for _ in range(3):
        assert served(await group.complete("hello")) == "b"
    state = group.targets[0].state.breaker
    assert state.state == "open" and "503" in (state.last_error or "")

    # Open: a is not asked at all.
    response = await group.complete("hello")
    assert served(response) == "b" and a.count(CHAT) == 3
    assert response.metadata["routing"]["skipped"] == {"a": "open"}

    # Cooled down: one probe goes to a; it succeeds and closes the breaker.
    clock.now += 30
    assert served(await group.complete("hello")) == "a"
    assert state.state == "closed" and a.count(CHAT) == 4
    await group.aclose()


async def test_a_failed_probe_reopens_the_breaker(servers):
    a, _b = servers
    clock = FakeClock()
    group = http_group(servers, clock=clock, breaker={"failures": 1, "cooldown_s": 30})
    a.script(Fault(status=503), Fault(status=503))
    await group.complete("hello")
    clock.now += 30
    response = await group.complete("hello")  # the probe fails: b answers
    assert served(response) == "b"
    assert [t["target"] for t in response.metadata["routing"]["tried"]] == ["a", "b"]
    breaker = group.targets[0].state.breaker
    assert breaker.state == "open" and breaker.opened_count == 2
    assert breaker.since == 30
    await group.aclose()


async def test_half_open_lets_exactly_one_probe_through(servers):
    a, _b = servers
    clock = FakeClock()
    group = http_group(servers, clock=clock, breaker={"failures": 1, "cooldown_s": 10})
    a.script(Fault(status=503))
    await group.complete("hello")
    clock.now += 10
    a.script(Fault(kind="delay", delay_s=30))  # hold the probe
    probe = asyncio.create_task(group.complete("probe"))
    assert await asyncio.to_thread(a.wait_for_requests, 2, 10.0)
    assert group.targets[0].state.breaker.state == "half_open"
    others = [await group.complete(f"other {i}") for i in range(3)]
    assert {served(r) for r in others} == {"b"}
    assert others[0].metadata["routing"]["skipped"] == {"a": "half_open"}
    assert a.count(CHAT) == 2  # the first failure and the probe, nothing else
    a.reset()
    assert served(await probe) == "a"
    assert group.targets[0].state.breaker.state == "closed"
    await group.aclose()


async def test_immediate_mode_fails_fast_when_every_breaker_is_open(servers):
    a, b = servers
    clock = FakeClock()
    group = http_group(servers, clock=clock, breaker={"failures": 1, "cooldown_s": 60})
    a.script(Fault(status=503))
    b.script(Fault(status=503))
    with pytest.raises(GroupExhaustedError):
        await group.complete("hello")
    with pytest.raises(NoHealthyTargetError, match="no healthy target") as info:
        await group.complete("hello")
    assert info.value.retry_after == pytest.approx(60)
    assert (a.count(CHAT), b.count(CHAT)) == (1, 1)
    await group.aclose()


async def test_queue_mode_waits_for_the_breaker_then_gets_an_answer(servers):
    a, _b = servers
    clock = FakeClock()
    group = http_group(
        servers,
        clock=clock,
        mode="queue",
        targets=[target("a", a)],
        breaker={"failures": 1, "cooldown_s": 45},
    )
    a.script(Fault(status=503))
    with pytest.raises(GroupExhaustedError):
        await group.complete("hello", model="a")  # pinned: fails at once, opens the breaker
    response = await group.complete("hello")  # queued until the cooldown is over
    assert served(response) == "a"
    assert response.metadata["routing"]["waited_s"] == pytest.approx(45)
    assert clock.now == pytest.approx(45)
    await group.aclose()
