"""ProviderGroup routing logic over mock targets, with a fake clock: no waiting, no network.

Strategies, breakers, budgets and modes are checked here on their own; the same behaviour
over real HTTP (loopback servers) is in tests/integration/test_provider_group_http.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from study_query_llm.providers import (
    BadRequestError,
    CompletionOptions,
    Message,
    PricingTable,
    ProviderResponse,
    RateLimitError,
    UnsupportedOperationError,
)
from study_query_llm.providers.capabilities import CapabilityRegistry, CapabilityRule, Strength
from study_query_llm.providers.group import (
    BreakerConfig,
    CircuitBreaker,
    GroupConfig,
    GroupExhaustedError,
    GroupState,
    GroupTargetError,
    NoHealthyTargetError,
    ProviderGroup,
    TargetConfig,
    TokenBucket,
    parse_groups,
)
from study_query_llm.providers.mock import MockProvider


class FakeClock:
    """A clock that only moves when something sleeps on it (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def mock_factory(behaviour: dict[str, dict[str, Any]] | None = None):
    """Targets become mock providers; `behaviour[key]` sets failure rates for one target."""
    behaviour = behaviour or {}

    def build(target: TargetConfig) -> MockProvider:
        return MockProvider(model=target.model, latency_ms=0, **behaviour.get(target.key, {}))

    return build


def make_group(
    targets: list[Any],
    *,
    behaviour: dict[str, dict[str, Any]] | None = None,
    clock: FakeClock | None = None,
    seed: int = 7,
    **config: Any,
) -> ProviderGroup:
    clock = clock or FakeClock()
    return ProviderGroup(
        GroupConfig(name="g", targets=targets, **config),
        factory=mock_factory(behaviour),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(seed),
        state=GroupState(),
    )


def served(response: ProviderResponse) -> str:
    return response.metadata["routing"]["target"]


SMALL, LARGE, EMBED = "mock:mock-small", "mock:mock-large", "mock:mock-embed"
FAIL = {"failure_rate": 1.0}  # every call a transient 503
REFUSE = {"permanent_failure_rate": 1.0}  # every call a permanent 400


# --- configuration ------------------------------------------------------------------------


def test_targets_accept_provider_model_shorthand_and_keys_default_to_provider_slash_model():
    config = GroupConfig(
        name="g", targets=["ollama:llama3.1:8b", {"provider": "mock", "model": "m"}]
    )
    assert [t.key for t in config.targets] == ["ollama/llama3.1:8b", "mock/m"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"targets": []}, "targets: List should have at least 1 item"),
        ({"targets": ["mock:a", "mock:a"]}, "two targets are both 'mock/a'; give one a distinct"),
        ({"targets": ["mock"]}, "must look like provider:model"),
        ({"targets": ["group:x:auto"]}, "a group cannot contain another group"),
        ({"targets": [SMALL], "strategy": "fastest"}, "strategy: Input should be 'failover'"),
        ({"targets": [SMALL], "required": ["telepathy"]}, "unknown capability 'telepathy'"),
        ({"targets": [SMALL], "min_strength": "good"}, "min_strength needs a task"),
        ({"targets": [SMALL], "breaker": {"failures": 0}}, "breaker.failures"),
        ({"targets": [SMALL], "colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_group_settings_are_one_clear_line_naming_the_group(spec, message):
    with pytest.raises(ValueError) as info:
        parse_groups({"fast": spec}, "PROVIDER_GROUPS")
    text = str(info.value)
    assert text.startswith("PROVIDER_GROUPS: group 'fast': ")
    assert message in text
    assert "\n" not in text


# --- failover and errors --------------------------------------------------------------------


async def test_failover_moves_on_a_transient_failure_and_says_what_was_tried():
    group = make_group([SMALL, LARGE], behaviour={"mock/mock-small": FAIL})
    response = await group.complete("Hello")
    routing = response.metadata["routing"]
    assert routing["target"] == "mock/mock-large"
    assert routing["strategy"] == "failover"
    assert [t["target"] for t in routing["tried"]] == ["mock/mock-small", "mock/mock-large"]
    assert routing["tried"][0]["error"] == "server_error"
    assert routing["tried"][0]["status_code"] == 503
    assert response.provider == "group:g"
    assert response.model == "mock-large"


async def test_a_permanent_failure_stops_the_request_without_trying_other_targets():
    group = make_group([SMALL, LARGE], behaviour={"mock/mock-small": REFUSE})
    with pytest.raises(GroupTargetError) as info:
        await group.complete("Hello")
    error = info.value
    assert error.kind == "bad_request" and not error.transient and error.status_code == 400
    assert [t["target"] for t in error.routing["tried"]] == ["mock/mock-small"]
    recorded = error.to_json()
    assert recorded["routing"]["last_target"] == "mock/mock-small"
    assert group.targets[1].state.picked == 0


async def test_when_every_target_fails_the_error_is_transient_and_lists_them_all():
    group = make_group([SMALL, LARGE], behaviour={"mock/mock-small": FAIL, "mock/mock-large": FAIL})
    with pytest.raises(GroupExhaustedError) as info:
        await group.complete("Hello")
    assert info.value.transient
    assert "all 2 target(s) failed" in str(info.value)
    assert [t["target"] for t in info.value.routing["tried"]] == [
        "mock/mock-small",
        "mock/mock-large",
    ]


# --- strategies -----------------------------------------------------------------------------


async def test_round_robin_spreads_1000_calls_exactly_evenly():
    group = make_group([SMALL, LARGE, "mock:mock-xl"], strategy="round_robin")
    counts = Counter([served(await group.complete(f"q{i}")) for i in range(1000)])
    assert sorted(counts.values()) == [333, 333, 334]


async def test_round_robin_skips_a_failing_target_and_still_answers_every_call():
    group = make_group(
        [SMALL, LARGE, "mock:mock-xl"],
        strategy="round_robin",
        behaviour={"mock/mock-large": FAIL},
        breaker={"failures": 1000},
    )
    counts = Counter([served(await group.complete(f"q{i}")) for i in range(300)])
    assert counts["mock/mock-large"] == 0
    assert counts["mock/mock-small"] + counts["mock/mock-xl"] == 300


async def test_weighted_follows_the_weights_over_1000_calls():
    group = make_group(
        [{"provider": "mock", "model": "mock-small", "weight": 1},
         {"provider": "mock", "model": "mock-large", "weight": 3}],
        strategy="weighted",
    )  # fmt: skip
    counts = Counter([served(await group.complete(f"q{i}")) for i in range(1000)])
    # Expected 250 / 750; the binomial standard deviation is ~14, so ±60 is > 4 sigma.
    assert abs(counts["mock/mock-small"] - 250) <= 60
    assert counts["mock/mock-small"] + counts["mock/mock-large"] == 1000


async def test_least_busy_prefers_the_target_with_fewest_requests_in_flight():
    group = make_group([SMALL, LARGE], strategy="least_busy")
    group.targets[0].state.in_flight = 3  # as if three requests were waiting on it
    assert {served(await group.complete(f"q{i}")) for i in range(20)} == {"mock/mock-large"}


async def test_latency_prefers_the_fastest_target_but_keeps_exploring():
    group = make_group([SMALL, LARGE, "mock:mock-xl"], strategy="latency", explore=0.1)
    request = group._candidates([group_message()], "auto", _options())
    # First, targets never measured are tried (in order), so each gets a sample.
    assert group._choose(request, group.targets).key == "mock/mock-small"
    for target, ms in zip(group.targets, (400.0, 50.0, 900.0), strict=True):
        target.state.observe_latency(ms)
    picks = Counter(group._choose(request, group.targets).key for _ in range(1000))
    assert picks["mock/mock-large"] >= 900  # ~93% = 90% best + 10% x 1/3 exploration
    assert picks["mock/mock-small"] > 0 and picks["mock/mock-xl"] > 0


async def test_latency_average_follows_recent_samples():
    group = make_group([SMALL], strategy="latency")
    state = group.targets[0].state
    for ms in (100.0, 100.0, 400.0):
        state.observe_latency(ms)
    assert state.latency_ms == pytest.approx(0.3 * 400 + 0.7 * 100)


def group_message() -> Message:
    return Message(role="user", content="hello")


async def test_cost_picks_the_cheapest_target_whose_capabilities_fit():
    pricing = PricingTable({"mock-small": (0.10, 0.20), "mock-large": (5.0, 10.0)})
    capabilities = CapabilityRegistry(
        [CapabilityRule("^mock-large$", strengths={"code": Strength.STRONG})]
    )
    targets = [LARGE, SMALL]

    def build(**config: Any) -> ProviderGroup:
        clock = FakeClock()
        return ProviderGroup(
            GroupConfig(name="g", targets=targets, strategy="cost", **config),
            factory=mock_factory(),
            clock=clock,
            sleep=clock.sleep,
            pricing=pricing,
            capabilities=capabilities,
        )

    assert served(await build().complete("hello")) == "mock/mock-small"
    # Only mock-large is strong enough at code: it is chosen although it costs more.
    strong = build(task="code", min_strength="strong")
    assert served(await strong.complete("hello")) == "mock/mock-large"
    assert [t.key for t in strong.select(task="code")] == ["mock/mock-large", "mock/mock-small"]


async def test_requests_go_only_to_targets_that_can_serve_them():
    group = make_group([EMBED, SMALL])  # mock-embed cannot chat
    assert served(await group.complete("hi", json_mode=True)) == "mock/mock-small"
    only_embed = make_group([EMBED])
    with pytest.raises(UnsupportedOperationError, match="no target of the group fits"):
        await only_embed.complete("hi")


async def test_model_argument_pins_a_target_or_narrows_to_a_model():
    group = make_group([SMALL, LARGE])
    assert served(await group.complete("hi", model="mock/mock-large")) == "mock/mock-large"
    assert served(await group.complete("hi", model="mock-large")) == "mock/mock-large"
    assert served(await group.complete("hi", model="auto")) == "mock/mock-small"
    with pytest.raises(BadRequestError, match="no configured target for model 'gpt-4o'"):
        await group.complete("hi", model="gpt-4o")


async def test_streaming_fails_over_before_the_first_chunk_and_tags_the_final_response():
    group = make_group([SMALL, LARGE], behaviour={"mock/mock-small": FAIL})
    items = [item async for item in group.stream("Tell me a story")]
    final = items[-1]
    assert isinstance(final, ProviderResponse)
    assert "".join(i for i in items[:-1] if isinstance(i, str)) == final.text
    assert final.metadata["routing"]["target"] == "mock/mock-large"
    assert len(final.metadata["routing"]["tried"]) == 2


# --- circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_half_opens_for_one_probe():
    breaker = CircuitBreaker(BreakerConfig(failures=3, cooldown_s=30))
    for _ in range(2):
        breaker.record_failure(0.0, "server_error: 503")
    assert breaker.state == "closed"
    breaker.record_failure(1.0, "server_error: 503")
    assert breaker.state == "open" and breaker.since == 1.0
    assert breaker.last_error == "server_error: 503"
    assert not breaker.available(30.9) and breaker.ready_in(30.9) == pytest.approx(0.1)
    assert breaker.acquire(31.0)  # cooled down: the one probe
    assert breaker.state == "half_open"
    assert not breaker.acquire(31.0) and not breaker.available(31.0)  # no second probe
    breaker.record_success(32.0)
    assert breaker.state == "closed" and breaker.consecutive_failures == 0


def test_a_failed_probe_opens_the_breaker_again_for_a_full_cooldown():
    breaker = CircuitBreaker(BreakerConfig(failures=1, cooldown_s=10))
    breaker.record_failure(0.0, "timeout")
    assert breaker.acquire(10.0)
    breaker.record_failure(10.5, "timeout again")
    assert breaker.state == "open" and breaker.ready_in(10.5) == pytest.approx(10.0)
    assert breaker.snapshot(10.5)["last_error"] == "timeout again"
    assert breaker.opened_count == 2


def test_breaker_opens_on_a_failure_rate_over_its_window():
    breaker = CircuitBreaker(BreakerConfig(failures=100, failure_rate=0.5, window=10, min_calls=10))
    for index in range(9):
        if index % 2:
            breaker.record_failure(float(index), "e")
        else:
            breaker.record_success(float(index))
    assert breaker.state == "closed"  # 4 of 9: too few calls, and under half
    breaker.record_failure(9.0, "e")
    assert breaker.state == "open"  # 5 of 10 failed


def test_a_cancelled_probe_frees_the_slot_for_the_next_request():
    breaker = CircuitBreaker(BreakerConfig(failures=1, cooldown_s=1))
    breaker.record_failure(0.0, "e")
    assert breaker.acquire(1.0)
    breaker.release()
    assert breaker.acquire(1.0)


async def test_an_open_breaker_keeps_requests_away_then_a_probe_closes_it():
    clock = FakeClock()
    group = make_group(
        [SMALL, LARGE],
        clock=clock,
        behaviour={"mock/mock-small": FAIL},
        breaker={"failures": 2, "cooldown_s": 30},
    )
    first = group.targets[0]
    for _ in range(2):
        await group.complete("hello")
    assert first.state.breaker.state == "open"
    calls_before = first.state.picked
    response = await group.complete("hello")
    assert first.state.picked == calls_before  # blocked: never called
    assert response.metadata["routing"]["skipped"] == {"mock/mock-small": "open"}
    clock.now += 30
    assert isinstance(first.provider, MockProvider)
    first.provider.failure_rate = 0.0  # it recovered
    response = await group.complete("hello")
    assert served(response) == "mock/mock-small"  # the probe went through and succeeded
    assert first.state.breaker.state == "closed"


# --- modes ----------------------------------------------------------------------------------


async def test_immediate_mode_fails_fast_when_no_target_is_healthy():
    clock = FakeClock()
    group = make_group(
        [SMALL], clock=clock, behaviour={"mock/mock-small": FAIL}, breaker={"failures": 1}
    )
    with pytest.raises(GroupExhaustedError):
        await group.complete("hello")
    with pytest.raises(NoHealthyTargetError) as info:
        await group.complete("hello")
    assert "no healthy target: mock/mock-small open for 30.0 s more" in str(info.value)
    assert info.value.retry_after == pytest.approx(30.0)
    assert info.value.transient
    assert clock.slept == []


async def test_queue_mode_waits_for_a_target_to_recover():
    clock = FakeClock()
    group = make_group(
        [SMALL],
        clock=clock,
        mode="queue",
        queue_timeout_s=120,
        behaviour={"mock/mock-small": FAIL},
        breaker={"failures": 1, "cooldown_s": 30},
    )
    with pytest.raises(GroupExhaustedError):  # fails, then waits, fails again... until deadline
        await group.complete("hello")
    assert group.targets[0].state.breaker.state == "open"
    assert sum(clock.slept) <= 120
    group.targets[0].provider.failure_rate = 0.0  # type: ignore[union-attr]
    response = await group.complete("hello")  # waits out the cooldown, then the probe works
    assert served(response) == "mock/mock-small"
    assert response.metadata["routing"]["waited_s"] == pytest.approx(clock.slept[-1])
    assert clock.slept[-1] <= 30


async def test_queue_mode_gives_up_at_its_deadline_with_a_clear_message():
    clock = FakeClock()
    group = make_group(
        [SMALL], clock=clock, mode="queue", queue_timeout_s=10, breaker={"cooldown_s": 60}
    )
    state = group.targets[0].state
    state.breaker.record_failure(clock.now, "server_error: 503")
    state.breaker._open(clock.now)
    with pytest.raises(NoHealthyTargetError, match=r"no target recovered within 10 s \(queue"):
        await group.complete("hello")


async def test_pinned_requests_never_queue():
    clock = FakeClock()
    group = make_group([SMALL, LARGE], clock=clock, mode="queue", breaker={"cooldown_s": 60})
    group.targets[0].state.breaker._open(clock.now)
    with pytest.raises(NoHealthyTargetError):
        await group.complete("hello", model="mock/mock-small")
    assert clock.slept == []


# --- budgets --------------------------------------------------------------------------------


def test_token_bucket_makes_callers_queue_in_order():
    bucket = TokenBucket(per_minute=60, capacity=1)  # one per second
    assert [bucket.reserve(1, 0.0) for _ in range(3)] == [0.0, 1.0, 2.0]
    assert bucket.wait_for(1, 3.0) == 0.0


async def test_requests_per_minute_space_out_calls_instead_of_sending_a_burst():
    clock = FakeClock()
    group = make_group(
        [{"provider": "mock", "model": "mock-small", "rpm": 60}], clock=clock
    )  # one request per second, no burst
    started = clock.now
    for index in range(5):
        await group.complete(f"q{index}")
    assert clock.slept == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert clock.now - started == pytest.approx(4.0)


async def test_a_spent_budget_sends_the_request_to_a_target_that_is_ready():
    clock = FakeClock()
    group = make_group([{"provider": "mock", "model": "mock-small", "rpm": 60}, LARGE], clock=clock)
    first, second = await group.complete("a"), await group.complete("b")
    assert (served(first), served(second)) == ("mock/mock-small", "mock/mock-large")
    assert clock.slept == []


async def test_tokens_per_minute_counts_the_real_usage():
    clock = FakeClock()
    group = make_group(
        [{"provider": "mock", "model": "mock-small", "tpm": 6000}], clock=clock
    )  # 100 tokens per second
    response = await group.complete("hello", max_tokens=5)
    bucket = group.targets[0].state.tokens
    assert bucket is not None
    assert bucket.tokens == pytest.approx(100 - response.total_tokens)


async def test_a_429_pauses_the_target_for_its_retry_after():
    clock = FakeClock()
    group = make_group([SMALL, LARGE], clock=clock)
    target = group.targets[0]
    group._failed(
        group._candidates([group_message()], "auto", _options()),
        target,
        RateLimitError("slow down", retry_after=12.0, provider="mock"),
    )
    assert target.state.budget_wait(1, clock.now) == pytest.approx(12.0)
    assert served(await group.complete("hi")) == "mock/mock-large"


def _options() -> CompletionOptions:
    return CompletionOptions()


async def test_status_reports_breaker_load_and_latency_per_target():
    group = make_group([SMALL, LARGE], behaviour={"mock/mock-small": FAIL}, breaker={"failures": 1})
    await group.complete("hello")
    rows = {row["target"]: row for row in group.status()}
    assert rows["mock/mock-small"]["breaker"]["state"] == "open"
    assert rows["mock/mock-small"]["breaker"]["since"]
    assert "injected transient failure" in rows["mock/mock-small"]["breaker"]["last_error"]
    assert rows["mock/mock-large"]["served"] == 1
    assert rows["mock/mock-large"]["latency_ms"] is not None
