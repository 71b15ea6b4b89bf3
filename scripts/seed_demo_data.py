"""Fill a database with a realistic, varied demo record so the dashboard has something to show.

    python scripts/seed_demo_data.py [--db URL] [--calls N] [--days D] [--seed S]

Everything is made with mock providers, so no key is needed and no record can be mistaken
for a real model's answer: `mock` plus two variants built from `MockProvider` with other
latency and failure settings (`mock-fast`, `mock-flaky`). What it records:

- `--calls` back-dated chat calls spread over the last `--days` days (several providers and
  models, latency profiles, successes, failures and timeouts). The services always stamp
  calls with the current time, so these rows are inserted directly, marked
  ``{"mock": true, "seeded": true}`` in their metadata;
- an experiment group and two label groups over some of those calls;
- live calls through the services: single runs (including an HTML-looking prompt that must
  show as text), three batch groups through `BatchService`, a conversation through
  `ConversationService`, and embeddings (`mock-embed`) of the experiment group's answers
  through `EmbeddingService`, so the Embeddings tab's "Compute" is answered from cache.

The database is migrated to the newest schema first; existing rows are kept (the record is
append-only), and group names carry the time of the run so running it twice adds a second
set. Prints what it made.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from study_query_llm.config import Settings, get_settings
from study_query_llm.db import migrate
from study_query_llm.db.connection import UnitOfWork, get_engine, run_write
from study_query_llm.db.records import NewCall, NewRun
from study_query_llm.db.urls import redact_url
from study_query_llm.providers import (
    BadRequestError,
    BaseLLMProvider,
    ProviderError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    RateLimitError,
    create,
)
from study_query_llm.providers.base import approx_token_count
from study_query_llm.providers.mock import MockProvider
from study_query_llm.providers.pricing import PricingTable
from study_query_llm.services.context import Services
from study_query_llm.services.conversation import ConversationService
from study_query_llm.services.embedding import EmbeddingService
from study_query_llm.services.inference import InferenceService, RetryPolicy, request_hash
from study_query_llm.services.jobs import BatchService, Target
from study_query_llm.services.recorder import CallRecorder

XSS_PROMPT = "<img src=x onerror=alert(1)>"

# Mock variants registered next to `mock`: same deterministic answers, other latency/faults.
MOCK_VARIANTS: dict[str, dict[str, float]] = {
    "mock-fast": {"latency_ms": 2.0, "failure_rate": 0.0},
    "mock-flaky": {"latency_ms": 10.0, "failure_rate": 0.3, "permanent_failure_rate": 0.05},
}

# Retries fast enough for a seed run (the mock's transient failures are retried).
SEED_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05, jitter_s=0.01)

PROMPTS: dict[str, list[str]] = {
    "science": [
        "Explain photosynthesis to a ten-year-old.",
        "Why is the sky blue during the day and red at sunset?",
        "What is the difference between a virus and a bacterium?",
        "How do vaccines train the immune system?",
        "Summarise the theory of plate tectonics in three sentences.",
        "What causes the seasons on Earth?",
    ],
    "programming": [
        "Write a Python function that reverses a linked list.",
        "Explain the difference between a process and a thread.",
        "What does `SELECT ... FOR UPDATE SKIP LOCKED` do in PostgreSQL?",
        "When should I use a dataclass instead of a dict?",
        "Explain big-O notation with an example.",
        "What is a race condition? Give a short example in Go.",
    ],
    "writing": [
        "Write a haiku about autumn rain.",
        "Suggest three titles for a blog post about remote work.",
        "Rewrite this sentence to be more formal: 'gonna be late, sorry'.",
        "Draft a polite email declining a meeting invitation.",
        "Give me a limerick about a cat who loves databases.",
    ],
    "history": [
        "Who built the first mechanical calculator?",
        "Summarise the causes of the First World War.",
        "What was the Silk Road and why did it matter?",
        "Describe the invention of the printing press and its effects.",
        "When did the Roman Republic become an empire?",
    ],
    "cooking": [
        "How do I make a simple tomato sauce?",
        "What is the Maillard reaction?",
        "Give me a vegetarian dinner idea that takes 20 minutes.",
        "How long should I rest a steak after cooking?",
    ],
    "odd inputs": [
        XSS_PROMPT,
        "Traduis en français : « the weather is lovely today »",
        "日本の首都はどこですか？",
        "List:\n- apples\n- pears\n\nWhich is sweeter?",
        "Answer with **bold** and _italic_ markdown: what is 2 + 2?",
    ],
}

ANSWER_WORDS: dict[str, list[str]] = {
    "science": "light energy cells chlorophyll atmosphere wavelength immune protein orbit "
    "tilt crust mantle molecules experiment evidence".split(),
    "programming": "function pointer memory thread lock query index complexity loop "
    "struct compile runtime concurrency transaction".split(),
    "writing": "rain leaves quiet morning title draft tone polite rhythm verse metaphor "
    "sincerely regards".split(),
    "history": "empire trade route century printing war treaty senate invention merchants "
    "caravans dynasty".split(),
    "cooking": "garlic olive oil simmer tomatoes basil salt sear rest heat caramelise "
    "browning flavour".split(),
    "odd inputs": "text input characters markup language translation answer sweet four "
    "symbols".split(),
}


@dataclass(frozen=True)
class Profile:
    """How one back-dated provider/model behaves: latency (log-normal) and failure odds."""

    provider: str
    model: str
    weight: float
    median_ms: float
    spread: float
    failure_rate: float
    timeout_rate: float


HISTORY: tuple[Profile, ...] = (
    Profile("mock", "mock-small", 0.30, 90.0, 0.35, 0.02, 0.00),
    Profile("mock", "mock-large", 0.20, 420.0, 0.45, 0.04, 0.02),
    Profile("mock-fast", "mock-small", 0.30, 18.0, 0.25, 0.01, 0.00),
    Profile("mock-flaky", "mock-small", 0.12, 160.0, 0.80, 0.18, 0.06),
    Profile("mock-flaky", "mock-large", 0.08, 650.0, 0.90, 0.22, 0.08),
)


def provider_factory(settings: Settings) -> Any:
    """`mock`, the mock variants, and whatever else the settings configure."""

    def factory(provider_id: str) -> BaseLLMProvider:
        if provider_id in MOCK_VARIANTS:
            return MockProvider(name=provider_id, seed=7, **MOCK_VARIANTS[provider_id])
        if provider_id == "mock":
            return create("mock", settings=settings, latency_ms=5.0, seed=7)
        return create(provider_id, settings=settings)

    return factory


def build_seed_services(settings: Settings) -> Services:
    """The usual services, over the seed's provider factory and fast retry policy."""
    engine = get_engine(settings.database_url)
    factory = provider_factory(settings)
    pricing = PricingTable(settings.pricing_table_overrides())
    recorder = CallRecorder(engine)
    inference = InferenceService(recorder, providers=factory, pricing=pricing, retry=SEED_RETRY)
    return Services(
        settings=settings,
        engine=engine,
        recorder=recorder,
        inference=inference,
        batches=BatchService(engine, inference),
        conversations=ConversationService(engine, inference),
        embeddings=EmbeddingService(engine, providers=factory, pricing=pricing, retry=SEED_RETRY),
    )


# --- back-dated history ----------------------------------------------------------------


def _answer(rng: random.Random, topic: str, prompt: str) -> str:
    words = [rng.choice(ANSWER_WORDS[topic]) for _ in range(rng.randint(10, 40))]
    subject = " ".join(prompt.split()[:8])
    return f"Mock answer about “{subject}”: " + " ".join(words) + "."


def _when(rng: random.Random, now: datetime, days: int) -> datetime:
    """A moment in the last `days` days, busier in working hours than at night."""
    while True:
        when = now - timedelta(seconds=rng.uniform(60, days * 86400))
        busy = 0.25 + 0.75 * math.exp(-(((when.hour - 14) / 4.5) ** 2))
        if rng.random() < busy:
            return when


def _error(rng: random.Random, profile: Profile, timeout: bool) -> ProviderError:
    if timeout:
        return ProviderTimeoutError(
            "request timed out after 60 s (mock)", provider=profile.provider, model=profile.model
        )
    kind = rng.random()
    if kind < 0.5:
        return ProviderUnavailableError(
            "injected transient failure (mock)",
            provider=profile.provider,
            model=profile.model,
            status_code=503,
        )
    if kind < 0.8:
        return RateLimitError(
            "rate limited (mock)",
            retry_after=float(rng.randint(1, 20)),
            provider=profile.provider,
            model=profile.model,
            status_code=429,
        )
    return BadRequestError(
        "injected permanent failure (mock)",
        provider=profile.provider,
        model=profile.model,
        status_code=400,
    )


def history_calls(
    n: int, days: int, rng: random.Random, pricing: PricingTable
) -> list[tuple[NewCall, NewRun | None, str]]:
    """`n` back-dated chat calls (with their v1 rows for successes) and each one's topic."""
    now = datetime.now(UTC)
    topics = list(PROMPTS)
    weights = [p.weight for p in HISTORY]
    out: list[tuple[NewCall, NewRun | None, str]] = []
    for _ in range(n):
        profile = rng.choices(HISTORY, weights)[0]
        topic = rng.choice(topics)
        prompt = rng.choice(PROMPTS[topic])
        temperature = rng.choice([0.0, 0.2, 0.7, 1.0])
        messages = [{"role": "user", "content": prompt}]
        options = {"temperature": temperature}
        created = _when(rng, now, days)
        latency = profile.median_ms * math.exp(rng.gauss(0.0, profile.spread))
        metadata = {"mock": True, "seeded": True, "topic": topic, "attempt": 1}
        draw = rng.random()
        common = {
            "provider": profile.provider,
            "model": profile.model,
            "request_json": {"messages": messages, "options": options},
            "request_hash": request_hash(profile.provider, profile.model, messages, options),
            "created_at": created,
        }
        if draw < profile.failure_rate + profile.timeout_rate:
            timeout = draw < profile.timeout_rate
            error = _error(rng, profile, timeout)
            call = NewCall(
                **common,
                status="timeout" if timeout else "failed",
                error_json=error.to_json(),
                latency_ms=60000.0 if timeout else round(latency * 0.3, 1),
                metadata_json={**metadata, "final_attempt": True},
            )
            out.append((call, None, topic))
            continue
        text = _answer(rng, topic, prompt)
        prompt_tokens = approx_token_count(prompt) + 3
        completion_tokens = approx_token_count(text)
        call = NewCall(
            **common,
            status="success",
            response_json={
                "text": text,
                "finish_reason": "stop",
                "raw": {"mock": True, "seeded": True},
            },
            latency_ms=round(latency, 1),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            cost_usd=pricing.cost_usd(profile.model, prompt_tokens, completion_tokens),
            metadata_json={**metadata, "requested_model": profile.model},
        )
        run = NewRun(
            prompt=prompt,
            response=text,
            provider=profile.provider,
            model=profile.model,
            tokens=prompt_tokens + completion_tokens,
            latency_ms=round(latency, 1),
            metadata_json={"mock": True, "seeded": True},
            created_at=created,
        )
        out.append((call, run, topic))
    out.sort(key=lambda item: item[0].created_at or now)
    return out


def write_history(
    engine: Any, calls: list[tuple[NewCall, NewRun | None, str]], stamp: str, rng: random.Random
) -> dict[str, Any]:
    """Insert the back-dated calls and make an experiment and two label groups over them."""

    def write(uow: UnitOfWork) -> dict[str, Any]:
        ids = uow.calls.add_many([call for call, _, _ in calls])
        uow.runs.add_many([run for _, run, _ in calls if run is not None])
        by_topic: dict[str, list[int]] = {}
        for call_id, (_, _, topic) in zip(ids, calls, strict=True):
            by_topic.setdefault(topic, []).append(call_id)
        experiment = uow.groups.create(
            "experiment",
            f"science vs programming prompts ({stamp})",
            description="Seeded demo: do answers differ by topic? (mock providers)",
            metadata={"mock": True, "seeded": True},
        )
        chosen = by_topic.get("science", [])[:40] + by_topic.get("programming", [])[:40]
        uow.groups.add_members(experiment.id, chosen)
        texts = {
            call_id: (call.response_json or {}).get("text", "")
            for call_id, (call, _, _) in zip(ids, calls, strict=True)
        }
        interesting = uow.groups.create(
            "label",
            f"interesting answers ({stamp})",
            description="Seeded demo label",
            metadata={"mock": True, "seeded": True},
        )
        uow.groups.add_members(interesting.id, rng.sample(ids, min(12, len(ids))), role="label")
        odd = uow.groups.create(
            "label",
            f"odd inputs ({stamp})",
            description="Seeded demo label: HTML, non-Latin scripts and markdown in prompts",
            metadata={"mock": True, "seeded": True},
        )
        uow.groups.add_members(odd.id, by_topic.get("odd inputs", [])[:30], role="label")
        return {
            "ids": ids,
            "experiment": (experiment.id, experiment.name, len(chosen)),
            "experiment_answers": [texts[i] for i in chosen if texts[i]],
            "labels": [(interesting.id, interesting.name), (odd.id, odd.name)],
        }

    return run_write(engine, write)


# --- live calls through the services ---------------------------------------------------


async def live_runs(services: Services) -> list[tuple[str, str, str, int]]:
    """A few single runs: (provider, prompt, status, last call id)."""
    runs = [
        ("mock", XSS_PROMPT, "mock-small"),
        ("mock", "Explain photosynthesis in one paragraph.", "mock-large"),
        ("mock-fast", "Name three uses of embeddings in research.", "mock-small"),
        ("mock-flaky", "What is a good retry policy for flaky APIs?", "mock-small"),
        ("mock-flaky", "Summarise the CAP theorem.", "mock-large"),
        ("mock", "This model does not exist, so the call fails.", "not-a-mock-model"),
    ]
    out = []
    for provider, prompt, model in runs:
        result = await services.inference.run(
            prompt, provider=provider, model=model, metadata={"seeded": True}
        )
        out.append((provider, prompt, result.status, result.call_ids[-1]))
    return out


async def live_batches(services: Services, stamp: str) -> list[dict[str, Any]]:
    """Three batch groups of different shapes; returns what each made."""
    plans = [
        (
            f"capitals quiz ({stamp})",
            [f"What is the capital of {c}?" for c in ("France", "Japan", "Kenya", "Peru", "Chile")],
            [Target("mock", "mock-small"), Target("mock-fast", "mock-small")],
            1,
            {"temperature": 0.0},
        ),
        (
            f"summaries, 2 samples ({stamp})",
            [
                "Summarise the plot of Hamlet in two sentences.",
                "Summarise how a hash map works.",
                "Summarise the water cycle.",
                "Summarise why the Roman Empire fell.",
            ],
            [Target("mock", "mock-large"), Target("mock-flaky", "mock-small")],
            2,
            {"temperature": 0.7},
        ),
        (
            f"code review prompts ({stamp})",
            [
                "Review: `for i in range(len(xs)): print(xs[i])`",
                "Review: `except Exception: pass`",
                "Review: `SELECT * FROM users WHERE name = '` + name + `'`",
            ],
            [
                Target("mock", "mock-small"),
                Target("mock", "mock-large"),
                Target("mock-flaky", "mock-large"),
            ],
            1,
            {"temperature": 0.2},
        ),
    ]
    made = []
    for name, prompts, targets, samples, options in plans:
        succeeded = failed = 0
        async for outcome in services.batches.run_batch(
            prompts, targets, n_samples=samples, options=options, name=name, concurrency=8
        ):
            if outcome.result is not None and outcome.result.ok:
                succeeded += 1
            else:
                failed += 1
        made.append({"name": name, "ok": succeeded, "failed": failed})
    return made


async def live_conversation(services: Services, stamp: str) -> tuple[int, str, int]:
    """A three-turn conversation stored as a conversation group."""
    conversation = await services.conversations.start(
        provider="mock",
        model="mock-large",
        system_prompt="You are a concise tutor for a curious student.",
        name=f"tutor chat ({stamp})",
    )
    turns = [
        "What is an embedding?",
        "How is cosine similarity computed?",
        "Why would I project embeddings to 2-D with PCA?",
    ]
    for turn in turns:
        await services.conversations.send(conversation.id, turn)
    return conversation.id, conversation.name, len(turns)


async def seed(settings: Settings, calls: int, days: int, seed_value: int) -> dict[str, Any]:
    """Record everything; returns a summary of what was made."""
    rng = random.Random(seed_value)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    services = await asyncio.to_thread(build_seed_services, settings)
    try:
        pricing = services.inference.pricing
        history = history_calls(calls, days, rng, pricing)
        written = await asyncio.to_thread(write_history, services.engine, history, stamp, rng)
        runs = await live_runs(services)
        batches = await live_batches(services, stamp)
        conversation = await live_conversation(services, stamp)
        # The experiment group's answers, so the Embeddings tab finds them in the cache.
        vectors = await services.embeddings.embed(
            written["experiment_answers"], provider="mock", model="mock-embed"
        )
    finally:
        await services.aclose()
    statuses: dict[str, int] = {}
    for call, _, _ in history:
        statuses[call.status] = statuses.get(call.status, 0) + 1
    return {
        "history": (len(history), statuses, days),
        "groups": written,
        "runs": runs,
        "batches": batches,
        "conversation": conversation,
        "embeddings": (written["experiment"][1], len(vectors)),
    }


def report(made: dict[str, Any], url: str, seconds: float) -> str:
    """What was made, as lines for a person."""
    count, statuses, days = made["history"]
    breakdown = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    exp_id, exp_name, exp_members = made["groups"]["experiment"]
    lines = [
        f"Seeded {url} in {seconds:.1f} s (mock providers only: mock, mock-fast, mock-flaky).",
        f"- {count} back-dated chat calls over {days} days ({breakdown})",
        f"- experiment group #{exp_id} {exp_name!r} with {exp_members} calls",
    ]
    lines += [f"- label group #{gid} {name!r}" for gid, name in made["groups"]["labels"]]
    lines += [
        f"- run on {provider}: {prompt[:50]!r} -> {status} (call {call_id})"
        for provider, prompt, status, call_id in made["runs"]
    ]
    lines += [
        f"- batch group {b['name']!r}: {b['ok']} succeeded, {b['failed']} failed"
        for b in made["batches"]
    ]
    conv_id, conv_name, turns = made["conversation"]
    lines.append(f"- conversation group #{conv_id} {conv_name!r} with {turns} turns")
    group, n_vectors = made["embeddings"]
    lines.append(f"- {n_vectors} mock-embed embeddings of the answers in {group!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seed_demo_data.py", description="Fill a database with a demo record (mock only)."
    )
    parser.add_argument("--db", help="database URL (default: DATABASE_URL / .env / settings)")
    parser.add_argument(
        "--calls", type=int, default=400, help="back-dated chat calls to record (default 400)"
    )
    parser.add_argument("--days", type=int, default=7, help="spread them over this many days")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args(argv)
    if args.calls < 0 or args.days < 1:
        parser.error("--calls must be >= 0 and --days >= 1")
    settings = get_settings()
    if args.db:
        settings = settings.model_copy(update={"database_url": args.db})
    started = time.perf_counter()
    made = asyncio.run(seed(settings, args.calls, args.days, args.seed))
    print(report(made, redact_url(settings.database_url), time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
