"""Provider groups: one provider over several provider/model targets, with routing and breakers.

A `ProviderGroup` is a `BaseLLMProvider` (id ``group:NAME``), usable wherever a provider id
is. Each request picks a target by the group's strategy, skips targets whose circuit
breaker is open, waits for per-target request/token budgets, and moves on to the next
target on a transient failure (never on a permanent one, such as a 400). Every response
carries ``metadata["routing"]``: the group, strategy, mode, the target that served it and
every target tried, with the errors that made it move on.

Strategies: ``failover`` (in order), ``round_robin``, ``weighted`` (random by weight),
``least_busy`` (fewest requests in flight), ``latency`` (lowest recent latency, exploring
others a share `explore` of the time, and untried targets first), ``cost`` (cheapest
target whose capabilities fit). Modes: ``immediate`` fails at once when no target is
healthy; ``queue`` waits (up to `queue_timeout_s`) until one recovers.

Breaker, budget and latency state lives in a `GroupState` shared by every instance of a
group in the process (one per browser session, say), so they agree on what is healthy.
Clocks, sleep and randomness are injectable, so behaviour is testable without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .base import (
    BaseLLMProvider,
    CompletionOptions,
    Message,
    ModelInfo,
    ProviderResponse,
    approx_token_count,
)
from .capabilities import (
    DEFAULT_COMPLETION_TOKENS,
    CapabilityRegistry,
    Strength,
    default_registry,
    estimated_cost,
    feature_name,
    task_name,
)
from .errors import (
    BadRequestError,
    MalformedResponseError,
    PermanentProviderError,
    ProviderConfigurationError,
    ProviderError,
    RateLimitError,
    TransientProviderError,
    UnsupportedOperationError,
)
from .pricing import PricingTable

GROUP_PREFIX = "group:"
AUTO = "auto"
Strategy = Literal["failover", "round_robin", "weighted", "least_busy", "latency", "cost"]
Mode = Literal["immediate", "queue"]
STRATEGIES: tuple[str, ...] = Strategy.__args__  # type: ignore[attr-defined]
MODES: tuple[str, ...] = Mode.__args__  # type: ignore[attr-defined]
BreakerState = Literal["closed", "open", "half_open"]

# How often a queued request looks again while a half-open probe is in flight.
PROBE_POLL_S = 0.25
# Backoff between rounds in queue mode when every target failed (doubles, capped).
ROUND_BACKOFF_S = (0.5, 10.0)
# Latency average: weight of the newest sample.
LATENCY_ALPHA = 0.3

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


# --- configuration ------------------------------------------------------------------------


class TargetConfig(BaseModel):
    """One provider/model a group can send to, with its optional budgets and overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(min_length=1, description="Provider id, e.g. openai.")
    model: str = Field(min_length=1, description="Model (or Azure deployment) to ask for.")
    name: str | None = Field(
        None,
        pattern=r"^[^\s]+$",
        max_length=120,
        description="Key of the target (default provider/model); needed to tell apart two "
        "targets with the same provider and model (e.g. two servers).",
    )
    weight: float = Field(1.0, gt=0, description="Share of requests for `weighted`.")
    rpm: float | None = Field(None, gt=0, description="Requests per minute budget.")
    tpm: float | None = Field(None, gt=0, description="Tokens per minute budget.")
    burst: float | None = Field(
        None, ge=1, description="Requests allowed at once before `rpm` spacing (default: 1 s)."
    )
    base_url: str | None = Field(None, description="Endpoint override for this target.")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding this target's key (keys never go in files).",
    )
    timeout_s: float | None = Field(None, gt=0, description="Request timeout override.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """Accept ``"provider:model"`` as a target (the model may contain colons)."""
        if isinstance(value, str):
            provider, sep, model = value.partition(":")
            if not sep or not provider.strip() or not model.strip():
                raise ValueError(f"target {value!r} must look like provider:model")
            return {"provider": provider.strip(), "model": model.strip()}
        return value

    @field_validator("provider")
    @classmethod
    def _no_nested_groups(cls, value: str) -> str:
        if value == GROUP_PREFIX.rstrip(":") or value.startswith(GROUP_PREFIX):
            raise ValueError("a group cannot contain another group")
        return value

    @property
    def key(self) -> str:
        return self.name or f"{self.provider}/{self.model}"


class BreakerConfig(BaseModel):
    """When a target's circuit opens, and for how long it cools down."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(5, ge=1, description="Consecutive transient failures that open it.")
    failure_rate: float | None = Field(
        None, gt=0, le=1, description="Or: this share of failures among the last `window`."
    )
    window: int = Field(20, ge=2, description="Calls the failure rate is measured over.")
    min_calls: int = Field(10, ge=1, description="Calls needed before the rate counts.")
    cooldown_s: float = Field(30.0, gt=0, description="Seconds open before a probe.")


class GroupConfig(BaseModel):
    """A named group of targets and how to route between them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    strategy: Strategy = "failover"
    mode: Mode = "immediate"
    queue_timeout_s: float = Field(120.0, gt=0, description="Longest wait in queue mode.")
    targets: list[TargetConfig] = Field(min_length=1)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    explore: float = Field(0.1, ge=0, le=1, description="Exploration share for `latency`.")
    required: list[str] = Field(default_factory=list, description="Features every target needs.")
    task: str | None = Field(None, description="Task for strength filtering and ordering.")
    min_strength: str | None = Field(None, description="Lowest strength for `task`.")
    description: str | None = None

    @field_validator("required")
    @classmethod
    def _known_features(cls, value: list[str]) -> list[str]:
        return [feature_name(f) for f in value]

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        return task_name(value) if value else None

    @field_validator("min_strength")
    @classmethod
    def _known_strength(cls, value: str | None) -> str | None:
        return Strength.parse(value).label if value else None

    @model_validator(mode="after")
    def _consistent(self) -> GroupConfig:
        keys = [t.key for t in self.targets]
        duplicate = next((k for k in keys if keys.count(k) > 1), None)
        if duplicate:
            raise ValueError(f"two targets are both {duplicate!r}; give one a distinct `name`")
        if self.min_strength and not self.task:
            raise ValueError("min_strength needs a task")
        return self

    @property
    def provider_id(self) -> str:
        return GROUP_PREFIX + self.name


def parse_groups(raw: Mapping[str, Any], source: str) -> dict[str, GroupConfig]:
    """Group configs from a mapping of name → settings; errors name the source and field."""
    groups: dict[str, GroupConfig] = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f'{source} must map group names to settings, like {{"fast": {{...}}}}')
    for name, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"{source}: group {name!r} must be a table of settings")
        if "name" in spec and spec["name"] != name:
            raise ValueError(f"{source}: group {name!r} has a different name {spec['name']!r}")
        try:
            groups[str(name)] = GroupConfig.model_validate({**spec, "name": name})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            raise ValueError(
                f"{source}: group {name!r}: {where + ': ' if where else ''}{message}"
            ) from None
    return groups


# --- runtime state: breaker, budgets, latency ----------------------------------------------


def _wall(now_wall: datetime | None = None) -> str:
    return (now_wall or datetime.now(UTC)).isoformat(timespec="seconds")


@dataclass
class CircuitBreaker:
    """Closed (traffic flows), open (cooling down), half-open (one probe allowed)."""

    config: BreakerConfig
    state: BreakerState = "closed"
    since: float | None = None  # clock time of the last state change
    since_wall: str | None = None
    opened_until: float = 0.0
    consecutive_failures: int = 0
    outcomes: deque[bool] = field(default_factory=deque)  # True = failure
    last_error: str | None = None
    last_error_at: str | None = None
    probe_in_flight: bool = False
    opened_count: int = 0

    def _move(self, state: BreakerState, now: float) -> None:
        if state != self.state:
            self.state = state
            self.since = now
            self.since_wall = _wall()

    def available(self, now: float) -> bool:
        """Whether a request may go to this target now (without taking the probe)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return now >= self.opened_until
        return not self.probe_in_flight

    def acquire(self, now: float) -> bool:
        """Take permission for one request; in half-open only one probe at a time."""
        if self.state == "open" and now >= self.opened_until:
            self._move("half_open", now)
            self.probe_in_flight = False
        if self.state == "closed":
            return True
        if self.state == "half_open" and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def release(self) -> None:
        """A request ended without an outcome (cancelled): free the probe slot."""
        self.probe_in_flight = False

    def record_success(self, now: float) -> None:
        self.consecutive_failures = 0
        self._remember(False)
        if self.state != "closed":
            self.outcomes.clear()
            self._move("closed", now)
        self.probe_in_flight = False

    def record_failure(self, now: float, error: str) -> None:
        self.last_error = error
        self.last_error_at = _wall()
        self.consecutive_failures += 1
        self._remember(True)
        if self.state == "half_open" or (self.state == "closed" and self._should_open()):
            self._open(now)
        self.probe_in_flight = False

    def _remember(self, failed: bool) -> None:
        self.outcomes.append(failed)
        while len(self.outcomes) > self.config.window:
            self.outcomes.popleft()

    def _should_open(self) -> bool:
        if self.consecutive_failures >= self.config.failures:
            return True
        rate = self.config.failure_rate
        return (
            rate is not None
            and len(self.outcomes) >= self.config.min_calls
            and self.window_failure_rate() >= rate
        )

    def _open(self, now: float) -> None:
        self.opened_until = now + self.config.cooldown_s
        self.opened_count += 1
        self._move("open", now)

    def window_failure_rate(self) -> float:
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else 0.0

    def ready_in(self, now: float) -> float:
        """Seconds until a request may be tried (0 when now)."""
        if self.state == "open":
            return max(0.0, self.opened_until - now)
        return 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since_wall,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "consecutive_failures": self.consecutive_failures,
            "window_failure_rate": round(self.window_failure_rate(), 4),
            "window_calls": len(self.outcomes),
            "retry_in_s": round(self.ready_in(now), 3) if self.state == "open" else None,
            "opened_count": self.opened_count,
        }


@dataclass
class TokenBucket:
    """A budget of `per_minute` units refilled continuously, holding at most `capacity`.

    `reserve()` takes the units at once (the balance may go below zero) and returns how
    long the caller must wait before using them, so concurrent callers queue up in order
    without a lock held across the wait.
    """

    per_minute: float
    capacity: float
    tokens: float = math.nan
    updated: float | None = None

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    def _refill(self, now: float) -> None:
        if self.updated is None or math.isnan(self.tokens):
            self.tokens = self.capacity
        else:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until `cost` units are available, without taking them."""
        self._refill(now)
        missing = cost - self.tokens
        return max(0.0, missing / self.rate) if missing > 0 else 0.0

    def reserve(self, cost: float, now: float) -> float:
        wait = self.wait_for(cost, now)
        self.tokens -= cost
        return wait

    def adjust(self, delta: float, now: float) -> None:
        """Correct a reservation once the real cost is known (negative gives units back)."""
        self._refill(now)
        self.tokens = min(self.capacity, self.tokens - delta)


@dataclass
class TargetState:
    """Everything a process knows about one target of one group."""

    breaker: CircuitBreaker
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    paused_until: float = 0.0  # from a 429's Retry-After
    in_flight: int = 0
    latency_ms: float | None = None  # moving average of successful requests
    last_latency_ms: float | None = None
    served: int = 0
    failed: int = 0
    picked: int = 0

    def configure(self, target: TargetConfig, breaker: BreakerConfig) -> None:
        """Apply (possibly changed) configuration, keeping the history."""
        self.breaker.config = breaker
        # Bursts default to one second's worth: smooth, and under per-second limits too.
        self.requests = _bucket(self.requests, target.rpm, target.burst)
        self.tokens = _bucket(self.tokens, target.tpm, None)

    def budget_wait(self, tokens: float, now: float) -> float:
        waits = [max(0.0, self.paused_until - now)]
        if self.requests is not None:
            waits.append(self.requests.wait_for(1, now))
        if self.tokens is not None:
            waits.append(self.tokens.wait_for(tokens, now))
        return max(waits)

    def reserve(self, tokens: float, now: float) -> float:
        waits = [max(0.0, self.paused_until - now)]
        if self.requests is not None:
            waits.append(self.requests.reserve(1, now))
        if self.tokens is not None:
            waits.append(self.tokens.reserve(tokens, now))
        return max(waits)

    def observe_latency(self, ms: float) -> None:
        self.last_latency_ms = ms
        self.latency_ms = (
            ms
            if self.latency_ms is None
            else LATENCY_ALPHA * ms + (1 - LATENCY_ALPHA) * self.latency_ms
        )


def _bucket(
    existing: TokenBucket | None, per_minute: float | None, capacity: float | None
) -> TokenBucket | None:
    if per_minute is None:
        return None
    capacity = max(1.0, capacity if capacity is not None else per_minute / 60.0)
    if existing is not None and (existing.per_minute, existing.capacity) == (per_minute, capacity):
        return existing
    return TokenBucket(per_minute, capacity)


class GroupState:
    """Target states of every group in a process, by group name and target key."""

    def __init__(self) -> None:
        self._targets: dict[tuple[str, str], TargetState] = {}
        self._cursors: dict[str, int] = {}
        self._lock = threading.Lock()

    def target(self, group: str, target: TargetConfig, breaker: BreakerConfig) -> TargetState:
        with self._lock:
            state = self._targets.get((group, target.key))
            if state is None:
                state = TargetState(CircuitBreaker(breaker))
                self._targets[(group, target.key)] = state
            state.configure(target, breaker)
            return state

    def next_cursor(self, group: str) -> int:
        with self._lock:
            cursor = self._cursors.get(group, 0)
            self._cursors[group] = cursor + 1
            return cursor

    def forget(self, group: str) -> None:
        with self._lock:
            for key in [k for k in self._targets if k[0] == group]:
                del self._targets[key]
            self._cursors.pop(group, None)


SHARED_STATE = GroupState()
"""The process-wide state used by groups built from configuration (`registry.create`)."""


def target_status(
    config: GroupConfig, target: TargetConfig, state: TargetState, now: float
) -> dict[str, Any]:
    """A target's breaker, load, latency and counts as a plain dict."""
    return {
        "group": config.name,
        "strategy": config.strategy,
        "mode": config.mode,
        "target": target.key,
        "provider": target.provider,
        "model": target.model,
        "weight": target.weight,
        "rpm": target.rpm,
        "tpm": target.tpm,
        "breaker": state.breaker.snapshot(now),
        "in_flight": state.in_flight,
        "latency_ms": None if state.latency_ms is None else round(state.latency_ms, 1),
        "served": state.served,
        "failed": state.failed,
    }


def group_status(config: GroupConfig, state: GroupState | None = None) -> list[dict[str, Any]]:
    """Status rows of a configured group from the shared state, without building clients."""
    state = state or SHARED_STATE
    now = time.monotonic()
    return [
        target_status(config, target, state.target(config.name, target, config.breaker), now)
        for target in config.targets
    ]


# --- errors -------------------------------------------------------------------------------


class _Routed:
    """Adds the request's routing (group, targets tried, errors) to the recorded error."""

    def with_routing(self, routing: dict[str, Any]) -> Any:
        self.routing = routing
        return self

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()  # type: ignore[misc]
        routing = getattr(self, "routing", None)
        if routing is not None:
            data["routing"] = routing
        return data


class NoHealthyTargetError(_Routed, RateLimitError):
    """No target may be tried (breakers open). `retry_after`: seconds until one may."""

    kind = "no_healthy_target"


class GroupExhaustedError(_Routed, RateLimitError):
    """Every target that could be tried failed transiently.

    It carries `retry_after` (as a `RateLimitError` does) when a target said when to come
    back or a breaker will let a probe through, so a retrying caller waits just that long.
    """

    kind = "group_exhausted"


class GroupTargetError(_Routed, PermanentProviderError):
    """A target failed permanently (e.g. 400): the group does not try others for it.

    `kind` and `status_code` are the target's; `cause` is its original error.
    """

    def __init__(self, message: str, *, cause: ProviderError, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.cause = cause
        self.kind = cause.kind


class StreamInterruptedError(_Routed, TransientProviderError):
    """A stream failed after text was shown, so no other target could take over."""

    def __init__(self, message: str, *, cause: ProviderError, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.cause = cause
        self.kind = cause.kind


# --- the group ----------------------------------------------------------------------------


@dataclass
class _Target:
    config: TargetConfig
    provider: BaseLLMProvider | None
    state: TargetState
    unavailable: str | None = None  # why it can never be used (not configured)
    index: int = 0

    @property
    def key(self) -> str:
        return self.config.key


@dataclass
class _Request:
    """One request's routing: candidates, what was tried, and the time it may take."""

    candidates: list[_Target]
    tokens: float
    cost_order: dict[str, tuple[float, int, int]]
    deadline: float | None
    pinned: bool
    tried: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)
    waited_s: float = 0.0
    rounds: int = 0
    retry_hint: float | None = None
    cursor: int = 0


TargetFactory = Callable[[TargetConfig], BaseLLMProvider]


class ProviderGroup(BaseLLMProvider):
    """A provider that routes each request to one of several provider/model targets."""

    provider_id: ClassVar[str] = "group"
    supports_stream: ClassVar[bool] = True
    supports_embeddings: ClassVar[bool] = False
    supports_json_mode: ClassVar[bool] = True  # checked per target at request time

    def __init__(
        self,
        config: GroupConfig,
        *,
        factory: TargetFactory,
        state: GroupState | None = None,
        capabilities: CapabilityRegistry | None = None,
        pricing: PricingTable | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(model=AUTO, name=name or config.provider_id)
        self.config = config
        self.capabilities = capabilities or default_registry()
        self.pricing = pricing or PricingTable()
        self.state = state or GroupState()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.targets: list[_Target] = []
        for index, target in enumerate(config.targets):
            target_state = self.state.target(config.name, target, config.breaker)
            try:
                provider: BaseLLMProvider | None = factory(target)
                reason = None
            except ProviderConfigurationError as exc:
                provider, reason = None, str(exc)
            self.targets.append(_Target(target, provider, target_state, reason, index))
        built = [t.provider for t in self.targets if t.provider is not None]
        self.is_mock = bool(built) and all(p.is_mock for p in built)

    # --- information ---------------------------------------------------------------------

    @property
    def strategy(self) -> str:
        return self.config.strategy

    def target_provider(self, key: str) -> BaseLLMProvider | None:
        return next((t.provider for t in self.targets if t.key == key), None)

    def status(self) -> list[dict[str, Any]]:
        """One row per target: breaker, budgets, load and latency (for the UI and CLI)."""
        now = self._clock()
        rows = []
        for target in self.targets:
            row = target_status(self.config, target.config, target.state, now)
            row.update(available=target.unavailable is None, unavailable=target.unavailable)
            rows.append(row)
        return rows

    def select(
        self,
        *,
        task: str | None = None,
        required: Sequence[str] = (),
        min_strength: str | None = None,
    ) -> list[TargetConfig]:
        """The group's targets that satisfy the requirements, strongest then cheapest first."""
        return self.capabilities.select(
            [t.config for t in self.targets if t.unavailable is None],
            task=task,
            required=required,
            min_strength=min_strength,
            pricing=self.pricing,
        )

    async def list_models(self) -> list[ModelInfo]:
        """``auto`` (the group chooses), then each target's key (asks that target only)."""
        models = [
            ModelInfo(
                id=AUTO,
                provider=self.name,
                owned_by="group",
                metadata={"strategy": self.strategy, "targets": [t.key for t in self.targets]},
            )
        ]
        for target in self.targets:
            caps = self.capabilities.for_model(target.config.model)
            price = self.pricing.price(target.config.model)
            models.append(
                ModelInfo(
                    id=target.key,
                    provider=self.name,
                    owned_by=target.config.provider,
                    context_length=caps.context_length,
                    input_price_per_mtok=price.input_per_mtok if price else None,
                    output_price_per_mtok=price.output_per_mtok if price else None,
                    metadata={"model": target.config.model, "capabilities": caps.to_json()},
                )
            )
        return models

    async def aclose(self) -> None:
        for target in self.targets:
            if target.provider is not None:
                await target.provider.aclose()

    # --- choosing candidates ---------------------------------------------------------------

    def _candidates(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> _Request:
        usable = [t for t in self.targets if t.unavailable is None]
        if not usable:
            reasons = "; ".join(t.unavailable or "" for t in self.targets)
            raise ProviderConfigurationError(
                f"no target of the group is configured: {reasons}", provider=self.name
            )
        pinned = False
        if model and model != AUTO:
            exact = [t for t in usable if t.key == model]
            if exact:
                usable, pinned = exact, True
            else:
                usable = [t for t in usable if t.config.model == model]
            if not usable:
                choices = sorted({AUTO, *(t.key for t in self.targets)})
                raise BadRequestError(
                    f"the group has no configured target for model {model!r}; use one of "
                    f"{', '.join(choices)} or a target's model",
                    provider=self.name,
                    model=model,
                )
        required = {"chat", *self.config.required}
        if options.json_mode:
            required.add("json_mode")
        prompt_tokens = sum(approx_token_count(m.content) + 3 for m in messages)
        completion = options.max_tokens or DEFAULT_COMPLETION_TOKENS
        fitting: list[_Target] = []
        for target in usable:
            caps = self.capabilities.for_model(target.config.model)
            if not caps.has(*required):
                continue
            if options.json_mode and not (target.provider and target.provider.supports_json_mode):
                continue
            if self.config.task and self.config.min_strength:
                strength = caps.strengths.get(self.config.task)
                if strength is None or strength < Strength.parse(self.config.min_strength):
                    continue
            if caps.context_length and prompt_tokens + completion > caps.context_length:
                continue
            fitting.append(target)
        if not fitting:
            needs = ", ".join(sorted(required)) or "the request's size"
            if self.config.task and self.config.min_strength:
                needs += f", {self.config.task} at least {self.config.min_strength}"
            raise UnsupportedOperationError(
                f"no target of the group fits this request (needs {needs})",
                provider=self.name,
                model=model,
            )
        # Cheapest first; for equal prices the stronger for the group's task first.
        task = self.config.task
        cost_order = {
            t.key: (
                estimated_cost(self.pricing, t.config.model, prompt_tokens, completion),
                -(self.capabilities.for_model(t.config.model).strengths.get(task) or 0)
                if task
                else 0,
                t.index,
            )
            for t in fitting
        }
        deadline = (
            self._clock() + self.config.queue_timeout_s
            if self.config.mode == "queue" and not pinned
            else None
        )
        return _Request(
            fitting,
            tokens=prompt_tokens + completion,
            cost_order=cost_order,
            deadline=deadline,
            pinned=pinned,
            cursor=self.state.next_cursor(self.config.name)
            if self.strategy == "round_robin"
            else 0,
        )

    def _choose(self, request: _Request, ready: list[_Target]) -> _Target:
        """The strategy's pick among targets that may be tried now."""
        strategy = self.strategy
        if strategy == "failover":
            return min(ready, key=lambda t: t.index)
        if strategy == "round_robin":
            count = len(request.candidates)
            position = {t.key: i for i, t in enumerate(request.candidates)}
            return min(ready, key=lambda t: (position[t.key] - request.cursor) % count)
        if strategy == "weighted":
            return self._rng.choices(ready, weights=[t.config.weight for t in ready])[0]
        if strategy == "least_busy":
            fewest = min(t.state.in_flight for t in ready)
            return self._rng.choice([t for t in ready if t.state.in_flight == fewest])
        if strategy == "latency":
            unknown = [t for t in ready if t.state.latency_ms is None]
            if unknown:
                return min(unknown, key=lambda t: t.index)
            if len(ready) > 1 and self._rng.random() < self.config.explore:
                return self._rng.choice(ready)
            return min(ready, key=lambda t: (t.state.latency_ms, t.index))
        return min(ready, key=lambda t: request.cost_order[t.key])  # cost

    async def _next_target(self, request: _Request) -> tuple[_Target, float]:
        """Wait until a target may be tried, take its breaker permission and budget.

        Returns the target and the seconds waited for its budget. Raises when no target
        can be tried (immediate mode) or none recovered before the deadline (queue mode).
        """
        while True:
            now = self._clock()
            untried = [t for t in request.candidates if t.key not in request.attempted]
            ready = [t for t in untried if t.state.breaker.available(now)]
            for target in untried:
                if target not in ready:
                    request.skipped[target.key] = target.state.breaker.state
            if ready:
                # Prefer targets whose budget is free now; else the one free soonest.
                waits = {t.key: t.state.budget_wait(request.tokens, now) for t in ready}
                free = [t for t in ready if waits[t.key] == 0]
                if free:
                    target = self._choose(request, free)
                else:
                    target = min(ready, key=lambda t: (waits[t.key], t.index))
                if not target.state.breaker.acquire(now):
                    continue  # lost the half-open probe to another request
                wait = target.state.reserve(request.tokens, now)
                if wait > 0:
                    try:
                        await self._sleep(wait)
                    except BaseException:
                        target.state.breaker.release()
                        raise
                    request.waited_s += wait
                return target, wait
            await self._wait_for_recovery(request, untried, now)

    async def _wait_for_recovery(
        self, request: _Request, untried: list[_Target], now: float
    ) -> None:
        """Nothing can be tried now: wait (queue mode) or raise (immediate mode)."""
        if untried:
            # Blocked by breakers: open ones reopen at a known time; a half-open one
            # waits on its probe, which may end at any moment.
            waits = [t.state.breaker.ready_in(now) for t in untried]
            soonest = min((w for w in waits if w > 0), default=PROBE_POLL_S)
            if any(t.state.breaker.state == "half_open" for t in untried):
                soonest = min(soonest, PROBE_POLL_S)
        else:
            # Every candidate failed this round: back off, then try them all again.
            if request.deadline is None:
                raise self._exhausted(request, now)
            base, cap = ROUND_BACKOFF_S
            soonest = max(request.retry_hint or 0.0, min(cap, base * 2**request.rounds))
        if request.deadline is None:
            if request.tried:
                raise self._exhausted(request, now)
            raise NoHealthyTargetError(
                f"no healthy target: {self._blocked(untried, now)}",
                provider=self.name,
                retry_after=round(min(t.state.breaker.ready_in(now) for t in untried), 3),
            ).with_routing(self._routing(request, None))
        if now + soonest > request.deadline:
            if request.tried:
                raise self._exhausted(request, now, waited=True)
            raise NoHealthyTargetError(
                f"no target recovered within {self.config.queue_timeout_s:g} s (queue mode): "
                f"{self._blocked(untried, now)}",
                provider=self.name,
                retry_after=round(min(t.state.breaker.ready_in(now) for t in untried), 3),
            ).with_routing(self._routing(request, None))
        await self._sleep(soonest)
        request.waited_s += soonest
        if not untried:
            request.rounds += 1
            request.attempted.clear()

    def _blocked(self, targets: list[_Target], now: float) -> str:
        parts = []
        for target in targets:
            breaker = target.state.breaker
            if breaker.state == "open":
                parts.append(f"{target.key} open for {breaker.ready_in(now):.1f} s more")
            else:
                parts.append(f"{target.key} half-open (probe in flight)")
        return "; ".join(parts)

    def _exhausted(
        self, request: _Request, now: float, waited: bool = False
    ) -> GroupExhaustedError:
        last = request.tried[-1] if request.tried else {}
        blocked = [t for t in request.candidates if t.state.breaker.state == "open"]
        hints = [h for h in (request.retry_hint,) if h is not None]
        hints += [t.state.breaker.ready_in(now) for t in blocked]
        suffix = f" after waiting {request.waited_s:.1f} s (queue mode)" if waited else ""
        return GroupExhaustedError(
            f"all {len(request.candidates)} target(s) failed{suffix}; last: "
            f"{last.get('target')}: {last.get('message')}",
            provider=self.name,
            retry_after=round(min(hints), 3) if hints else None,
        ).with_routing(self._routing(request, None))

    # --- outcomes ------------------------------------------------------------------------

    def _routing(self, request: _Request, served: _Target | None) -> dict[str, Any]:
        routing: dict[str, Any] = {
            "group": self.config.name,
            "strategy": self.strategy,
            "mode": self.config.mode,
            "target": served.key if served else None,
            "tried": list(request.tried),
        }
        if served is None and request.tried:
            routing["last_target"] = request.tried[-1]["target"]
        if request.skipped:
            routing["skipped"] = dict(request.skipped)
        if request.waited_s:
            routing["waited_s"] = round(request.waited_s, 3)
        if request.pinned:
            routing["pinned"] = True
        return routing

    def _succeeded(
        self, request: _Request, target: _Target, response: ProviderResponse
    ) -> ProviderResponse:
        now = self._clock()
        state = target.state
        state.breaker.record_success(now)
        state.served += 1
        state.observe_latency(response.latency_ms)
        if state.tokens is not None and response.total_tokens is not None:
            state.tokens.adjust(response.total_tokens - request.tokens, now)
        request.tried.append(
            {
                "target": target.key,
                "provider": target.config.provider,
                "model": target.config.model,
                "outcome": "success",
                "latency_ms": response.latency_ms,
            }
        )
        routing = self._routing(request, target)
        return response.model_copy(
            update={
                "provider": self.name,
                "metadata": {
                    **response.metadata,
                    "routing": routing,
                    "target_provider": target.config.provider,
                },
            }
        )

    def _failed(
        self, request: _Request, target: _Target, error: ProviderError, *, final: bool = False
    ) -> None:
        """Note a failure; raise when the request must stop here (permanent, or `final`)."""
        now = self._clock()
        state = target.state
        entry: dict[str, Any] = {
            "target": target.key,
            "provider": target.config.provider,
            "model": target.config.model,
            "outcome": "failed",
            "error": error.kind,
            "transient": error.transient,
            "message": error.message[:300],
        }
        if error.status_code is not None:
            entry["status_code"] = error.status_code
        request.tried.append(entry)
        request.attempted.add(target.key)
        if error.transient:
            state.failed += 1
            state.breaker.record_failure(now, f"{error.kind}: {error.message[:200]}")
            if isinstance(error, RateLimitError) and error.retry_after is not None:
                state.paused_until = max(state.paused_until, now + error.retry_after)
                request.retry_hint = min(request.retry_hint or math.inf, error.retry_after)
            if state.tokens is not None:
                state.tokens.adjust(-request.tokens, now)
        else:
            # The target answered: it is reachable, whatever was wrong with the request.
            state.breaker.record_success(now)
        common: dict[str, Any] = {
            "cause": error,
            "provider": self.name,
            "model": error.model,
            "status_code": error.status_code,
            "body": error.body,
        }
        if not error.transient:
            raise GroupTargetError(f"{target.key}: {error.message}", **common).with_routing(
                self._routing(request, None)
            )
        if final:
            raise StreamInterruptedError(f"{target.key}: {error.message}", **common).with_routing(
                self._routing(request, None)
            )

    # --- the provider API ----------------------------------------------------------------

    def _forward(self, options: CompletionOptions) -> dict[str, Any]:
        return options.model_dump(exclude_defaults=True)

    async def _complete(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> ProviderResponse:
        request = self._candidates(messages, model, options)
        forward = self._forward(options)
        while True:
            target, _wait = await self._next_target(request)
            assert target.provider is not None
            target.state.in_flight += 1
            target.state.picked += 1
            finished = False
            try:
                response = await target.provider.complete(
                    messages, model=target.config.model, **forward
                )
                finished = True
                return self._succeeded(request, target, response)
            except ProviderError as error:
                finished = True
                self._failed(request, target, error)
            finally:
                target.state.in_flight -= 1
                if not finished:
                    target.state.breaker.release()
                    if target.state.tokens is not None:
                        target.state.tokens.adjust(-request.tokens, self._clock())

    async def _stream(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> AsyncIterator[str | ProviderResponse]:
        request = self._candidates(messages, model, options)
        forward = self._forward(options)
        while True:
            target, _wait = await self._next_target(request)
            assert target.provider is not None
            target.state.in_flight += 1
            target.state.picked += 1
            finished = False
            shown = False
            try:
                async with contextlib.aclosing(
                    target.provider.stream(messages, model=target.config.model, **forward)
                ) as items:
                    async for item in items:
                        if isinstance(item, ProviderResponse):
                            finished = True
                            yield self._succeeded(request, target, item)
                            return
                        shown = True
                        yield item
                raise _malformed_stream(self.name, target.key)
            except ProviderError as error:
                if finished:
                    raise
                finished = True
                # Once text was shown, another target cannot take over the answer.
                self._failed(request, target, error, final=shown)
            finally:
                target.state.in_flight -= 1
                if not finished:
                    target.state.breaker.release()


def _malformed_stream(group: str, key: str) -> ProviderError:
    return MalformedResponseError(
        f"{key}: the stream ended without a final response", provider=group
    )


# --- building groups from settings --------------------------------------------------------


def build_group(
    config: GroupConfig,
    *,
    build_target: Callable[[TargetConfig], BaseLLMProvider],
    state: GroupState | None = None,
    capabilities: CapabilityRegistry | None = None,
    pricing: PricingTable | None = None,
    **kwargs: Any,
) -> ProviderGroup:
    """A group over targets made by `build_target` (normally `registry.create`)."""
    return ProviderGroup(
        config,
        factory=build_target,
        state=state or SHARED_STATE,
        capabilities=capabilities,
        pricing=pricing,
        **kwargs,
    )


def group_name(provider_id: str) -> str | None:
    """``"fast"`` for ``"group:fast"``; None for any other provider id."""
    return provider_id[len(GROUP_PREFIX) :] if provider_id.startswith(GROUP_PREFIX) else None
