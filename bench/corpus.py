"""Synthetic but realistic call records for the scale benchmarks (used by generate.py).

Calls arrive in time order over `days` days with a daily and weekly rhythm and slow
growth; each comes from one of several providers and models with its own traffic share
and skewed (lognormal) latency; about 3% fail (rate limits, server errors, timeouts,
cancellations) with an `error_json`; a quarter run inside batch groups (some batches
belong to an experiment); a few are labelled. Prompts and answers are composed from
topic vocabularies into sentences of realistic length (lognormal: prompts ~200
characters, answers ~700, with a long tail), about 8% in other languages (French,
German, Spanish, Portuguese, Russian, Japanese, Chinese), and some carry rare tokens
("quokka", ticket numbers) for rare-substring searches. Everything follows from the seed.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from study_query_llm.providers.pricing import PricingTable

RARE_WORD = "quokka"  # in about 1 call of 10,000
RARE_WORD_RATE = 1e-4


@dataclass(frozen=True)
class ModelProfile:
    """One provider/model: its traffic share, latency distribution and failure rate."""

    provider: str
    model: str
    share: float
    latency_median_ms: float
    latency_sigma: float  # of log(latency)
    failure_rate: float
    modality: str = "chat"
    active_from: float = 0.0  # fraction of the period after which it is used


PROFILES: tuple[ModelProfile, ...] = (
    ModelProfile("openai", "gpt-4o-mini", 0.26, 650, 0.55, 0.015),
    ModelProfile("openai", "gpt-4o", 0.12, 1400, 0.6, 0.02),
    ModelProfile("openai", "gpt-4.1-mini", 0.06, 800, 0.5, 0.02, active_from=0.4),
    ModelProfile("openai", "text-embedding-3-small", 0.05, 120, 0.4, 0.005, "embedding"),
    ModelProfile("anthropic", "claude-haiku-4-5", 0.14, 900, 0.5, 0.025),
    ModelProfile("anthropic", "claude-sonnet-4-5", 0.08, 2600, 0.55, 0.035),
    ModelProfile("azure", "gpt-4o", 0.07, 1600, 0.65, 0.04),
    ModelProfile("openrouter", "meta-llama/llama-3.3-70b-instruct", 0.07, 1900, 0.8, 0.06),
    ModelProfile("openrouter", "deepseek-ai/deepseek-v3", 0.04, 3200, 0.9, 0.07),
    ModelProfile("hyperbolic", "Qwen/Qwen2.5-72B-Instruct", 0.04, 2200, 0.85, 0.05),
    ModelProfile("ollama", "llama3.1:8b", 0.05, 4200, 0.7, 0.02),
    ModelProfile("vllm", "mistral-small", 0.02, 700, 0.45, 0.03, "completion"),
)

FAILURES = (  # (status, error type, HTTP status, message, share of failures)
    ("failed", "RateLimitError", 429, "rate limit reached; retry after {n} s", 0.40),
    ("failed", "ProviderUnavailableError", 503, "upstream overloaded (HTTP 503)", 0.15),
    ("failed", "ProviderError", 500, "internal server error (HTTP 500)", 0.10),
    ("failed", "BadRequestError", 400, "maximum context length exceeded ({n} tokens)", 0.05),
    ("timeout", "ProviderTimeoutError", None, "no answer within {n} s", 0.22),
    ("cancelled", "CancelledError", None, "cancelled by the user", 0.08),
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in at most three sentences.",
    "You are an expert reviewer. Be precise and cite evidence where you can.",
    "Answer as a patient teacher would, step by step.",
    "Respond in JSON with the keys 'answer' and 'confidence'.",
)

TOPICS: dict[str, dict[str, list[str]]] = {
    "science": {
        "nouns": "cell energy light atmosphere wavelength protein orbit planet molecule "
        "experiment hypothesis evidence climate ocean volcano gene enzyme neuron galaxy "
        "particle photon carbon oxygen membrane species ecosystem fossil crystal magnet "
        "current circuit".split(),
        "verbs": "absorbs reflects releases converts measures predicts explains supports "
        "contradicts produces stores transfers accelerates slows".split(),
        "adjs": "visible chemical physical biological stable unstable dense thermal "
        "magnetic cellular solar microscopic".split(),
    },
    "programming": {
        "nouns": "function variable thread process query index transaction cache "
        "compiler interpreter pointer array dictionary module package test server "
        "client request response database schema migration lock queue stream buffer "
        "iterator closure decorator exception".split(),
        "verbs": "returns raises allocates locks parses compiles caches retries "
        "serialises validates iterates awaits commits rolls-back".split(),
        "adjs": "asynchronous concurrent immutable mutable recursive typed generic "
        "idempotent atomic lazy cached distributed".split(),
    },
    "writing": {
        "nouns": "sentence paragraph tone audience draft title metaphor rhythm story "
        "character plot argument summary email letter poem verse chapter essay".split(),
        "verbs": "conveys suggests shapes frames softens strengthens clarifies "
        "introduces concludes persuades".split(),
        "adjs": "formal informal vivid concise persuasive lyrical clear warm polite direct".split(),
    },
    "business": {
        "nouns": "customer revenue margin forecast contract invoice budget market "
        "strategy supplier pricing risk quarter report meeting deadline policy "
        "product launch team".split(),
        "verbs": "increases reduces negotiates reviews approves delays prioritises "
        "allocates tracks reports".split(),
        "adjs": "quarterly annual strategic operational regional competitive "
        "profitable urgent".split(),
    },
    "health": {
        "nouns": "patient symptom diagnosis treatment dose vaccine trial risk diet "
        "exercise sleep muscle heart blood pressure infection recovery".split(),
        "verbs": "reduces increases prevents treats monitors improves affects triggers".split(),
        "adjs": "chronic acute mild severe clinical preventive daily healthy".split(),
    },
}

FUNCTION = {
    "det": "the the the a a this that each every another".split(),
    "prep": "in on with for about from into during under between through".split(),
    "conj": "and but because although while so".split(),
}

QUESTION_TEMPLATES = (
    "How does {det} {adj} {noun} {verb_base} {det2} {noun2}?",
    "Why is {det} {noun} {adj} {prep} {det2} {noun2}?",
    "What is the difference between {det} {noun} and {det2} {noun2}?",
    "Can you explain how {det} {noun} {verb} {det2} {adj} {noun2}?",
    "Summarise the role of {det} {adj} {noun} {prep} {det2} {noun2}.",
    "Write a short note about {det} {noun} {prep} {det2} {adj} {noun2}.",
    "Give three examples of {det} {adj} {noun} that {verb} {det2} {noun2}.",
    "Compare {det} {noun} with {det2} {adj} {noun2} and list the trade-offs.",
)
ANSWER_TEMPLATES = (
    "{Det} {adj} {noun} {verb} {det2} {noun2} {prep} {det3} {noun3}.",
    "In short, {det} {noun} {verb} {det2} {adj} {noun2} {conj} {det3} {noun3} {verb2} it.",
    "{Det} {noun} is {adj} {prep} {det2} {noun2}, {conj} {det3} {noun3} {verb} more slowly.",
    "First, {det} {noun} {verb} {det2} {noun2}; then {det3} {adj} {noun3} {verb2} the result.",
    "This means {det} {adj} {noun} {verb} {det2} {noun2} {prep} most cases.",
    "A common mistake is to assume {det} {noun} {verb} {det2} {adj} {noun2}.",
    "For example, {det} {noun} {prep} {det2} {noun2} {verb} {det3} {adj} {noun3}.",
    "Note that {det} {noun} {verb} {det2} {noun2} only when {det3} {noun3} is {adj}.",
)

FOREIGN: dict[str, list[str]] = {
    "fr": [
        "Pouvez-vous expliquer comment fonctionne la photosynthèse ?",
        "La réponse dépend du contexte et des données disponibles.",
        "Voici un résumé des points principaux de l'article.",
        "Il faut vérifier la configuration du serveur avant la migration.",
        "Le modèle répond correctement dans la plupart des cas.",
        "Traduisez ce paragraphe en anglais, s'il vous plaît.",
        "Les résultats montrent une amélioration nette de la latence.",
        "Nous recommandons une approche progressive et prudente.",
    ],
    "de": [
        "Können Sie mir den Unterschied zwischen Prozess und Thread erklären?",
        "Die Antwort hängt von der Größe der Datenbank ab.",
        "Zusammenfassend lässt sich sagen, dass die Ergebnisse stabil sind.",
        "Bitte formulieren Sie diese E-Mail höflicher.",
        "Das Modell liefert in den meisten Fällen eine gute Übersetzung.",
        "Für große Tabellen empfiehlt sich ein zusätzlicher Index.",
        "Schreiben Sie ein kurzes Gedicht über den Herbst.",
    ],
    "es": [
        "¿Cuál es la diferencia entre un virus y una bacteria?",
        "La respuesta corta es que depende de los datos.",
        "Aquí tienes tres ideas para una cena vegetariana rápida.",
        "El sistema procesa las solicitudes en orden de llegada.",
        "Resume este texto en dos frases, por favor.",
        "Los resultados del experimento fueron sorprendentes.",
    ],
    "pt": [
        "Explique como funciona uma transação em um banco de dados.",
        "A resposta depende do tamanho da amostra.",
        "Escreva um e-mail educado recusando o convite.",
        "O modelo respondeu corretamente a todas as perguntas.",
    ],
    "ru": [
        "Объясните, пожалуйста, как работает кэширование.",
        "Ответ зависит от размера базы данных и нагрузки.",
        "Напишите короткое стихотворение об осеннем дожде.",
        "Результаты эксперимента оказались стабильными.",
        "Модель отвечает быстро, но иногда ошибается.",
    ],
    "ja": [
        "日本の首都はどこですか？",
        "光合成の仕組みを簡単に説明してください。",
        "この文章を英語に翻訳してください。",
        "結果は安定しており、遅延も改善されました。",
        "データベースの索引はなぜ重要ですか？",
    ],
    "zh": [
        "请解释一下进程和线程的区别。",
        "这个问题的答案取决于数据的规模。",
        "请用三句话总结这篇文章。",
        "模型在大多数情况下都能给出正确的回答。",
        "为什么天空是蓝色的？",
    ],
}
FOREIGN_SHARE = 0.08


def _pricing_cost() -> dict[str, tuple[float, float] | None]:
    table = PricingTable()
    prices: dict[str, tuple[float, float] | None] = {}
    for profile in PROFILES:
        price = table.price(profile.model)
        prices[profile.model] = (
            None if price is None else (price.input_per_mtok, price.output_per_mtok)
        )
    return prices


class TextPool:
    """Pre-built sentences (questions and answer sentences per topic, and foreign ones)."""

    def __init__(self, rng: random.Random, per_topic: int = 4000) -> None:
        self.questions: list[str] = []
        self.answers: list[str] = []
        for topic in TOPICS.values():
            for _ in range(per_topic // 4):
                self.questions.append(self._fill(rng, rng.choice(QUESTION_TEMPLATES), topic))
            for _ in range(per_topic):
                self.answers.append(self._fill(rng, rng.choice(ANSWER_TEMPLATES), topic))
        self.foreign = [s for sentences in FOREIGN.values() for s in sentences]

    @staticmethod
    def _fill(rng: random.Random, template: str, topic: dict[str, list[str]]) -> str:
        det = rng.choice(FUNCTION["det"])
        values = {
            "det": det,
            "Det": det.capitalize(),
            "det2": rng.choice(FUNCTION["det"]),
            "det3": rng.choice(FUNCTION["det"]),
            "noun": rng.choice(topic["nouns"]),
            "noun2": rng.choice(topic["nouns"]),
            "noun3": rng.choice(topic["nouns"]),
            "verb": rng.choice(topic["verbs"]),
            "verb2": rng.choice(topic["verbs"]),
            "verb_base": rng.choice(topic["verbs"]).removesuffix("s"),
            "adj": rng.choice(topic["adjs"]),
            "prep": rng.choice(FUNCTION["prep"]),
            "conj": rng.choice(FUNCTION["conj"]),
        }
        return template.format(**values)


class _Uniforms:
    """Uniform random numbers in [0, 1), drawn from numpy in blocks."""

    def __init__(self, generator: np.random.Generator) -> None:
        self._generator = generator
        self._block: list[float] = []
        self._next = 0

    def take(self) -> float:
        if self._next >= len(self._block):
            self._block = self._generator.random(65_536).tolist()
            self._next = 0
        value = self._block[self._next]
        self._next += 1
        return value


@dataclass
class Batch:
    """A batch group being filled: its calls arrive one after another in time."""

    key: str
    size: int
    models: tuple[int, ...]
    experiment: str | None
    members: int = 0


@dataclass
class GeneratedChunk:
    """One chunk of calls in time order, with the group memberships they take part in."""

    calls: list[dict[str, Any]]
    # group key -> (group_type, name, description) for groups first seen in this chunk
    new_groups: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # (index of the call in `calls`, group key, role)
    memberships: list[tuple[int, str, str | None]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # v1 rows (with_v1)
    run_batches: list[str | None] = field(default_factory=list)


class CallGenerator:
    """Makes `rows` calls spread over `days` days ending at `end`, chunk by chunk."""

    def __init__(
        self,
        rows: int,
        *,
        seed: int = 8,
        days: float = 30.0,
        end: datetime | None = None,
        tag: str = "",
        batch_share: float = 0.25,
        label_rate: float = 0.004,
        with_v1: bool = False,
    ) -> None:
        self.rows = rows
        self.days = days
        self.end = (end or datetime.now(UTC)).astimezone(UTC)
        self.start = self.end - timedelta(days=days)
        self.tag = tag
        self.batch_share = batch_share
        self.label_rate = label_rate
        self.with_v1 = with_v1
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.pool = TextPool(self.rng)
        self.prices = _pricing_cost()
        self.batch: Batch | None = None
        self.batches_made = 0
        self.experiments_made = 0
        self.experiment: str | None = None
        self.experiment_left = 0
        self.labels = ("label: helpful", "label: wrong", "label: needs review", "label: toxic")
        self._announced: set[str] = set()
        self._uniforms = _Uniforms(self.np)
        self._hour_counts = self._spread()
        early = [p.share if p.active_from == 0 else 0.0 for p in PROFILES]
        self._early_cumulative = list(itertools.accumulate(early))
        self._late_cumulative = list(itertools.accumulate(p.share for p in PROFILES))

    # --- when -------------------------------------------------------------------------

    def _spread(self) -> np.ndarray:
        """Calls per hour: a daily rhythm (busy afternoons UTC), quiet weekends, growth."""
        hours = max(1, math.ceil(self.days * 24))
        starts = [self.start + timedelta(hours=h) for h in range(hours)]
        weights = np.array(
            [
                (1.0 + 0.8 * math.sin((t.hour - 9) / 24 * 2 * math.pi))
                * (0.45 if t.weekday() >= 5 else 1.0)
                * (0.7 + 0.6 * h / hours)
                for h, t in enumerate(starts)
            ]
        )
        weights /= weights.sum()
        return self.np.multinomial(self.rows, weights)

    def _times(self) -> Iterator[datetime]:
        for hour, count in enumerate(self._hour_counts):
            if not count:
                continue
            base = self.start + timedelta(hours=hour)
            offsets = np.sort(self.np.random(count)) * 3600.0
            for offset in offsets.tolist():
                created_at = base + timedelta(seconds=offset)
                if created_at < self.end:
                    yield created_at

    # --- what -------------------------------------------------------------------------

    def _draws(self, n: int) -> dict[str, list[Any]]:
        """Random numbers for the next `n` calls, drawn in bulk (numpy) for speed."""
        g = self.np
        return {
            "u": g.random((n, 8)).tolist(),
            "z": g.standard_normal(n).tolist(),
            "prompt_n": np.maximum(1, g.lognormal(math.log(2.0), 0.6, n).astype(int)).tolist(),
            "answer_n": np.clip(g.lognormal(math.log(8.0), 0.7, n).astype(int), 1, 120).tolist(),
        }

    def _text(self, sentences: list[str], n: int) -> str:
        size = len(sentences)
        take = self._uniforms.take
        return " ".join([sentences[int(take() * size)] for _ in range(n)])

    def _rare(self, text: str, roll: float) -> str:
        if roll < RARE_WORD_RATE:
            return f"{text} The {RARE_WORD} question again."
        if roll < RARE_WORD_RATE + 2e-3:
            return f"{text} (ticket #{self.rng.randrange(16**6):06X})"
        return text

    def _pick_profile(self, fraction: float, roll: float) -> int:
        cumulative = self._late_cumulative if fraction >= 0.4 else self._early_cumulative
        return min(bisect.bisect_left(cumulative, roll * cumulative[-1]), len(PROFILES) - 1)

    def _batch_for(self, profile: int) -> Batch | None:
        """The batch this call belongs to (or None), starting new batches as needed."""
        if self.batch is not None and self.batch.members >= self.batch.size:
            self.batch = None
        if self.batch is None:
            if self.rng.random() >= self.batch_share / 200:  # ~200-call batches on average
                return None
            self.batches_made += 1
            experiment = None
            if self.experiment_left <= 0 and self.rng.random() < 0.3:
                self.experiments_made += 1
                self.experiment = f"bench{self.tag} experiment {self.experiments_made:05d}"
                self.experiment_left = self.rng.randint(2, 6)
            if self.experiment_left > 0:
                experiment = self.experiment
                self.experiment_left -= 1
            size = int(min(20_000, max(5, self.rng.lognormvariate(math.log(120), 1.0))))
            chat = [i for i, p in enumerate(PROFILES) if p.modality == "chat"]
            models = tuple(self.rng.sample(chat, self.rng.randint(1, 3)))
            self.batch = Batch(
                f"bench{self.tag} batch {self.batches_made:06d}", size, models, experiment
            )
        return self.batch if profile in self.batch.models or self.rng.random() < 0.5 else None

    def chunks(self, size: int) -> Iterator[GeneratedChunk]:
        """The calls, `size` at a time, oldest first."""
        total_s = (self.end - self.start).total_seconds()
        times = self._times()
        while True:
            moments = list(itertools.islice(times, size))
            if not moments:
                return
            chunk = GeneratedChunk([])
            draws = self._draws(len(moments))
            for i, created_at in enumerate(moments):
                u = draws["u"][i]
                fraction = (created_at - self.start).total_seconds() / total_s
                index = self._pick_profile(fraction, u[0])
                batch = self._batch_for(index)
                if batch is not None:
                    index = batch.models[int(u[1] * len(batch.models))]
                self._call(
                    chunk,
                    PROFILES[index],
                    created_at,
                    batch,
                    u,
                    draws["z"][i],
                    draws["prompt_n"][i],
                    draws["answer_n"][i],
                )
            yield chunk

    def _call(
        self,
        chunk: GeneratedChunk,
        p: ModelProfile,
        created_at: datetime,
        batch: Batch | None,
        u: list[float],
        z: float,
        prompt_n: int,
        answer_n: int,
    ) -> None:
        rng = self.rng
        foreign = u[2] < FOREIGN_SHARE
        pool = self.pool
        if foreign:
            prompt = self._text(pool.foreign, prompt_n)
        else:
            question = self._text(pool.questions, 1)
            context = self._text(pool.answers, prompt_n - 1) if prompt_n > 1 else ""
            prompt = f"{context} {question}" if context else question
        prompt = self._rare(prompt, u[3])
        latency: float | None = p.latency_median_ms * math.exp(p.latency_sigma * z)
        status = "success"
        error = None
        if u[4] < p.failure_rate:
            status, error, latency = self._failure(latency)
        if p.modality == "embedding":
            request: dict[str, Any] = {"input": prompt, "options": {"dimensions": 1536}}
        elif p.modality == "completion":
            request = {"prompt": prompt, "options": {"max_tokens": 512}}
        else:
            messages = [{"role": "user", "content": prompt}]
            if u[5] < 0.3:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[int(u[6] * 5)]})
            options = {"temperature": (0.0, 0.2, 0.7, 1.0)[int(u[7] * 4)], "max_tokens": 1024}
            request = {"messages": messages, "options": options}
        prompt_tokens = completion_tokens = total_tokens = None
        response = None
        cost = None
        if status == "success":
            prompt_tokens = max(1, len(prompt) // 4 + 8)
            if p.modality == "embedding":
                completion_tokens = 0
                response = {"dimensions": 1536, "raw": {"object": "list"}}
            else:
                if foreign:
                    text = self._text(pool.foreign, max(1, answer_n // 3))
                else:
                    text = self._text(pool.answers, answer_n)
                text = self._rare(text, rng.random())
                completion_tokens = max(1, len(text) // 4)
                response = {
                    "text": text,
                    "finish_reason": "stop" if u[1] < 0.97 else "length",
                    "raw": {"id": f"resp-{rng.getrandbits(48):012x}"},
                }
            total_tokens = prompt_tokens + completion_tokens
            price = self.prices.get(p.model)
            if price is not None:
                cost = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000
        digest = hashlib.blake2b(
            f"{p.provider}|{p.model}|{prompt}".encode(), digest_size=32
        ).hexdigest()
        metadata: dict[str, Any] = {"attempt": 1 if status == "success" else rng.randint(1, 3)}
        if batch is not None:
            metadata["batch"] = batch.key
        call = {
            "provider": p.provider,
            "model": p.model,
            "modality": p.modality,
            "status": status,
            "request_json": request,
            "response_json": response,
            "error_json": error,
            "latency_ms": latency,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
            "cost_usd": cost,
            "request_hash": digest,
            "metadata_json": metadata,
            "created_at": created_at,
        }
        position = len(chunk.calls)
        chunk.calls.append(call)
        if batch is not None:
            if batch.members == 0:
                self._announce(chunk, batch.key, "batch")
                if batch.experiment is not None:
                    self._announce(chunk, batch.experiment, "experiment")
            batch.members += 1
            chunk.memberships.append((position, batch.key, "final"))
            if batch.experiment is not None:
                chunk.memberships.append((position, batch.experiment, None))
        if rng.random() < self.label_rate:
            label = f"bench{self.tag} {rng.choice(self.labels)}"
            self._announce(chunk, label, "label")
            chunk.memberships.append((position, label, None))
        if self.with_v1 and status == "success" and p.modality == "chat":
            chunk.runs.append(
                {
                    "prompt": prompt,
                    "response": response["text"] if response else None,
                    "provider": p.provider,
                    "model": p.model,
                    "tokens": total_tokens,
                    "latency_ms": latency,
                    "metadata_json": {"attempt": 1},
                    "batch_id": batch.key if batch is not None else None,
                    "created_at": created_at,
                }
            )

    def _announce(self, chunk: GeneratedChunk, key: str, group_type: str) -> None:
        """Make the group `key` in this chunk unless an earlier chunk made it."""
        if key in self._announced:
            return
        self._announced.add(key)
        chunk.new_groups[key] = (group_type, key, f"synthetic benchmark {group_type}")

    def _failure(self, latency: float) -> tuple[str, dict[str, Any], float | None]:
        roll = self.rng.random()
        chosen = FAILURES[-1]
        for failure in FAILURES:
            roll -= failure[4]
            if roll <= 0:
                chosen = failure
                break
        status, kind, http, message, _share = chosen
        text = message.format(n=self.rng.choice((5, 10, 30, 60, 128_000)))
        error: dict[str, Any] = {"type": kind, "message": text, "transient": http != 400}
        if http is not None:
            error["status_code"] = http
        if status == "timeout":
            return status, error, float(self.rng.choice((30_000, 60_000, 120_000)))
        if status == "cancelled":
            return status, error, None
        return status, error, latency * 0.3
