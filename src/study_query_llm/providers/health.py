"""Provider health: per target, reachability, a tiny request's latency, breaker state, failures.

`check_health(services)` looks at every configured provider and every target of every
provider group:

- reachability and latency of listing its models (free: no tokens are used);
- the latency of a tiny completion (``max_tokens=1``), sent through `InferenceService` so
  it is recorded like every call (``metadata.purpose = "health_check"``); a group target
  is asked through its group (pinned to it), so its circuit breaker sees the outcome and
  an open breaker is reported rather than bypassed;
- the target's circuit breaker (groups only);
- the recent failure rate of its calls, counted by the database over the whole window
  (for a group target: the group's calls it served or failed last).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select

from ..db.connection import UnitOfWork
from ..db.filters import CallFilters
from ..db.models_v2 import RawCall
from .base import BaseLLMProvider
from .errors import ProviderError
from .group import GROUP_PREFIX, ProviderGroup, group_name
from .registry import ProviderSpec, configured, get_spec

HEALTH_PROMPT = "Reply with the single word OK."
HEALTH_METADATA = {"purpose": "health_check"}
DEFAULT_WINDOW = timedelta(hours=1)


@dataclass
class TargetHealth:
    """The health of one provider (or one target of a group)."""

    provider: str
    model: str | None
    target: str | None = None  # the group target's key; None for a plain provider
    reachable: bool | None = None
    listing_ms: float | None = None
    models_listed: int | None = None
    request_ms: float | None = None
    call_id: int | None = None
    error: str | None = None
    breaker: dict[str, Any] | None = None
    recent_calls: int = 0
    recent_failures: int = 0

    def note(self, problem: str) -> None:
        """Add a problem to `error` (listing and request problems are both kept)."""
        self.error = f"{self.error}; {problem}" if self.error else problem

    @property
    def failure_rate(self) -> float | None:
        return self.recent_failures / self.recent_calls if self.recent_calls else None

    @property
    def label(self) -> str:
        if self.target:
            return f"{self.provider} → {self.target}"
        return f"{self.provider} ({self.model})" if self.model else self.provider

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["failure_rate"] = None if self.failure_rate is None else round(self.failure_rate, 4)
        return data


async def _timed(coro: Any, timeout_s: float) -> tuple[Any, float]:
    started = time.perf_counter()
    result = await asyncio.wait_for(coro, timeout_s)
    return result, round((time.perf_counter() - started) * 1000.0, 1)


async def _check_listing(
    health: TargetHealth, provider: BaseLLMProvider | None, timeout_s: float
) -> None:
    if provider is None:
        health.reachable = False
        return
    try:
        models, health.listing_ms = await _timed(provider.list_models(), timeout_s)
        health.models_listed = len(models)
        health.reachable = True
    except ProviderError as exc:
        health.reachable = False
        health.error = f"listing: {exc}"
    except TimeoutError:
        health.reachable = False
        health.error = f"listing: no answer within {timeout_s:g} s"


async def _check_request(
    health: TargetHealth, services: Any, provider_id: str, model: str | None, timeout_s: float
) -> None:
    from ..services.inference import NO_RETRY

    try:
        result, elapsed = await _timed(
            services.inference.run(
                HEALTH_PROMPT,
                provider=provider_id,
                model=model,
                options={"max_tokens": 1, "temperature": 0.0},
                metadata=HEALTH_METADATA,
                retry=NO_RETRY,
            ),
            timeout_s,
        )
    except TimeoutError:
        health.note(f"request: no answer within {timeout_s:g} s")
        return
    except ProviderError as exc:  # raised before any call (bad model, not configured)
        health.note(f"request: {exc}")
        return
    health.call_id = result.call_id
    if result.ok:
        health.request_ms = result.response.latency_ms if result.response else elapsed
        health.reachable = True if health.reachable is None else health.reachable
    else:
        health.note(f"request: {result.error}")


def _group(services: Any, provider_id: str) -> ProviderGroup:
    group = services.inference.provider(provider_id)
    assert isinstance(group, ProviderGroup)
    return group


def _recent_stats(engine: Any, window: timedelta) -> tuple[list[Any], dict[tuple[str, str], Any]]:
    """Per (provider, model) stats, and per (group, target) counts, over the window."""
    start = datetime.now(UTC) - window
    target = func.coalesce(
        RawCall.metadata_json["routing"]["target"].as_string(),
        RawCall.error_json["routing"]["last_target"].as_string(),
    )
    # Calls through a group are recorded under the target's own provider, with the group
    # and target in their routing (a failure's routing is in its error).
    group = func.coalesce(
        RawCall.metadata_json["routing"]["group"].as_string(),
        RawCall.error_json["routing"]["group"].as_string(),
    )
    per_target = (
        select(
            group,
            target,
            func.count(),
            func.sum(case((RawCall.status == "success", 0), else_=1)),
        )
        .where(group.is_not(None), RawCall.created_at >= start)
        .group_by(group, target)
    )
    with UnitOfWork(engine) as uow:
        stats = uow.calls.by_provider_model(CallFilters(start=start))
        targets = {
            (f"{GROUP_PREFIX}{name}", key): (int(count), int(failures or 0))
            for name, key, count, failures in uow.session.execute(per_target)
            if key is not None
        }
    return stats, targets


def _apply_stats(health: TargetHealth, provider: str, model: str | None, stats: list[Any]) -> None:
    """Calls of `provider` whose model is `model` (or a dated version of it), or all its calls."""
    for row in stats:
        if row.provider != provider:
            continue
        if model and not (row.model == model or str(row.model).startswith(f"{model}-")):
            continue
        health.recent_calls += row.count
        health.recent_failures += row.failures


async def check_health(
    services: Any,
    *,
    provider_ids: Sequence[str] | None = None,
    request: bool = True,
    window: timedelta = DEFAULT_WINDOW,
    timeout_s: float = 30.0,
) -> list[TargetHealth]:
    """Health rows for the configured providers and group targets (or only `provider_ids`).

    With `request=False` no completion is sent (nothing is spent or recorded).
    """
    settings = services.settings
    specs: list[ProviderSpec] = (
        [get_spec(pid, settings) for pid in provider_ids]
        if provider_ids
        else [s for s in configured(settings)]
    )
    rows: list[TargetHealth] = []
    jobs: list[Any] = []
    summaries: list[tuple[TargetHealth, ProviderGroup, list[TargetHealth]]] = []
    for spec in specs:
        if group_name(spec.id) is not None:
            group = _group(services, spec.id)
            group_row = TargetHealth(spec.id, "auto")
            rows.append(group_row)
            members: list[TargetHealth] = []
            summaries.append((group_row, group, members))
            for target in group.targets:
                health = TargetHealth(spec.id, target.config.model, target=target.key)
                rows.append(health)
                members.append(health)
                if target.unavailable:
                    health.reachable = False
                    health.error = target.unavailable
                    continue
                jobs.append(_check_target(health, services, group, target.key, request, timeout_s))
            continue
        model = spec.default_model(settings)
        health = TargetHealth(spec.id, model)
        rows.append(health)
        jobs.append(_check_plain(health, services, spec, model, request, timeout_s))
    limit = asyncio.Semaphore(8)

    async def bounded(job: Any) -> None:
        async with limit:
            await job

    await asyncio.gather(*(bounded(job) for job in jobs))
    # Counted after the checks, so their own recorded requests are included.
    stats, per_target = await asyncio.to_thread(_recent_stats, services.engine, window)
    for row in rows:
        if row.target is not None:
            row.recent_calls, row.recent_failures = per_target.get(
                (row.provider, row.target), (0, 0)
            )
        else:
            _apply_stats(row, row.provider, None if row.model == "auto" else row.model, stats)
    for group_row, group, members in summaries:
        # The group itself: reachable when any of its targets is.
        group_row.reachable = any(m.reachable for m in members)
        group_row.breaker = {"strategy": group.strategy, "mode": group.config.mode}
    return rows


async def _check_plain(
    health: TargetHealth,
    services: Any,
    spec: ProviderSpec,
    model: str | None,
    request: bool,
    timeout_s: float,
) -> None:
    try:
        provider = services.inference.provider(spec.id)
    except ProviderError as exc:
        health.reachable, health.error = False, str(exc)
        return
    await _check_listing(health, provider, timeout_s)
    if request and model and "chat" in spec.capabilities:
        await _check_request(health, services, spec.id, model, timeout_s)


async def _check_target(
    health: TargetHealth,
    services: Any,
    group: ProviderGroup,
    key: str,
    request: bool,
    timeout_s: float,
) -> None:
    await _check_listing(health, group.target_provider(key), timeout_s)
    if request:
        await _check_request(health, services, group.name, key, timeout_s)
    health.breaker = next(row["breaker"] for row in group.status() if row["target"] == key)
