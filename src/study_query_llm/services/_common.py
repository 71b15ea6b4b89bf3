"""Small pieces the services share: provider clients, what they learnt, off-loop database work."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine

from ..db.connection import UnitOfWork, run_write
from ..providers import BaseLLMProvider, ModelNotFoundError, create
from ..providers.group import GROUP_PREFIX

T = TypeVar("T")

# How long an answer about a model is remembered: a deployment created meanwhile is used
# once this has passed since the 404.
MODEL_MEMORY_TTL_S = 600.0
MODEL_MEMORY_MAX_ENTRIES = 4096
# How long calls wait for the first call to a model not seen yet: a 404 comes back at
# once, so a first call still running after this means the model exists.
PROBE_WAIT_S = 5.0

# provider id, endpoint (base URL; None for the provider's default), model, modality
ModelKey = tuple[str, str | None, str, str]


class RememberedModelNotFoundError(ModelNotFoundError):
    """An earlier request for this model got a 404: this one was not sent."""

    def __init__(self, original: ModelNotFoundError, *, age_s: float, retry_in_s: float) -> None:
        super().__init__(
            original.message,
            provider=original.provider,
            model=original.model,
            status_code=original.status_code,
        )
        self.age_s = age_s
        self.retry_in_s = retry_in_s

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["remembered"] = True
        data["detail"] = (
            f"not sent: the provider answered 404 for this model {self.age_s:.0f} s ago "
            f"(remembered as unknown); it is asked again in {self.retry_in_s:.0f} s"
        )
        return data


@dataclass(frozen=True)
class _Learnt:
    error: ModelNotFoundError | None  # None: the model answered
    at: float


class ModelMemory:
    """What providers said about models: which answered, which are unknown (HTTP 404).

    Thread-safe and bounded: an entry expires `ttl_s` after it was learnt and the oldest
    go first beyond `max_entries`. `MODEL_MEMORY` is the one the services share in a
    process (every browser session builds its own pool), so one 404 serves them all.
    """

    def __init__(
        self,
        *,
        ttl_s: float = MODEL_MEMORY_TTL_S,
        max_entries: int = MODEL_MEMORY_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0 or max_entries < 1:
            raise ValueError("the model memory needs a positive ttl and room for an entry")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[ModelKey, _Learnt] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def answered(self, key: ModelKey) -> bool:
        """Whether a call for this model succeeded within the last `ttl_s`."""
        entry = self._recall(key)
        return entry is not None and entry.error is None

    def unknown(self, key: ModelKey) -> RememberedModelNotFoundError | None:
        """The remembered 404 for this model (as an error to raise), if there is one."""
        entry = self._recall(key)
        if entry is None or entry.error is None:
            return None
        age = self._clock() - entry.at
        return RememberedModelNotFoundError(
            entry.error, age_s=age, retry_in_s=max(0.0, self.ttl_s - age)
        )

    def learn(self, key: ModelKey, error: ModelNotFoundError | None) -> None:
        """Remember that the model answered (`error` None) or is unknown (its 404)."""
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = _Learnt(error, self._clock())
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, key: ModelKey | None = None) -> None:
        """Forget one model, or everything."""
        with self._lock:
            if key is None:
                self._entries.clear()
            else:
                self._entries.pop(key, None)

    def _recall(self, key: ModelKey) -> _Learnt | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry.at >= self.ttl_s:
                del self._entries[key]
                return None
            return entry


MODEL_MEMORY = ModelMemory()
"""The process-wide memory of the services' pools (`services.context.build_services`)."""


class ProviderPool:
    """Provider instances by id, built once from a factory and reused (one SDK client each).

    Calls made through `checked()` consult and feed a `ModelMemory`: a model that got a 404
    fails at once (until the memory expires) instead of asking the provider again.
    """

    def __init__(
        self,
        factory: Callable[[str], BaseLLMProvider] | None = None,
        *,
        models: ModelMemory | None = None,
    ) -> None:
        self._factory = factory or create
        self._instances: dict[str, BaseLLMProvider] = {}
        self.models = models if models is not None else ModelMemory()
        self._probes: dict[ModelKey, asyncio.Future[None]] = {}

    def get(self, provider_id: str) -> BaseLLMProvider:
        instance = self._instances.get(provider_id)
        if instance is None:
            instance = self._factory(provider_id)
            self._instances[provider_id] = instance
        return instance

    def model_key(self, provider_id: str, model: str, modality: str) -> ModelKey:
        return (provider_id, getattr(self.get(provider_id), "base_url", None), model, modality)

    def unknown_model(
        self, provider_id: str, model: str, modality: str
    ) -> RememberedModelNotFoundError | None:
        return self.models.unknown(self.model_key(provider_id, model, modality))

    def model_answered(self, provider_id: str, model: str, modality: str) -> bool:
        return self.models.answered(self.model_key(provider_id, model, modality))

    def learn(
        self, provider_id: str, model: str, modality: str, error: BaseException | None
    ) -> None:
        """Note what a call showed: an answer (None) or a 404; other errors say nothing."""
        if error is None or (
            isinstance(error, ModelNotFoundError)
            and not isinstance(error, RememberedModelNotFoundError)
        ):
            self.models.learn(self.model_key(provider_id, model, modality), error)

    async def checked(
        self, provider_id: str, model: str, modality: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Make `call`, unless the model is remembered as unknown: then raise that 404 now.

        The first call for a model not seen yet is a probe: calls for it that arrive
        meanwhile wait for its answer (up to `PROBE_WAIT_S`) instead of all asking about a
        model that may not exist. A provider group is called as is: it routes each request to
        targets of its own.
        """
        if provider_id.startswith(GROUP_PREFIX):
            return await call()
        key = self.model_key(provider_id, model, modality)
        loop = asyncio.get_running_loop()
        probe: asyncio.Future[None] | None = None
        known = False
        while True:
            remembered = self.models.unknown(key)
            if remembered is not None:
                raise remembered
            if known := self.models.answered(key):
                break
            pending = self._probes.get(key)
            if pending is None:
                probe = self._probes[key] = loop.create_future()
                break
            if pending.get_loop() is not loop:
                break
            try:
                await asyncio.wait_for(asyncio.shield(pending), PROBE_WAIT_S)
            except TimeoutError:
                break  # still running: the model exists
        try:
            result = await call()
        except BaseException as exc:
            self.learn(provider_id, model, modality, exc)
            raise
        finally:
            if probe is not None:
                if self._probes.get(key) is probe:
                    del self._probes[key]
                probe.set_result(None)
        if not known:
            self.learn(provider_id, model, modality, None)
        return result

    async def aclose(self) -> None:
        instances = list(self._instances.values())
        self._instances.clear()
        for instance in instances:
            await instance.aclose()


def as_pool(providers: ProviderPool | Callable[[str], BaseLLMProvider] | None) -> ProviderPool:
    """A pool from a pool (shared), a factory, or nothing (the registry's `create`)."""
    return providers if isinstance(providers, ProviderPool) else ProviderPool(providers)


async def db_io(engine: Engine, fn: Callable[[UnitOfWork], T], *, write: bool = False) -> T:
    """Run `fn(uow)` off the event loop; writes commit (retrying transient errors)."""
    if write:
        return await asyncio.to_thread(run_write, engine, fn)

    def read() -> T:
        with UnitOfWork(engine) as uow:
            return fn(uow)

    return await asyncio.to_thread(read)
