"""Small pieces the services share: a pool of provider clients and off-loop database work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine

from ..db.connection import UnitOfWork, run_write
from ..providers import BaseLLMProvider, create

T = TypeVar("T")


class ProviderPool:
    """Provider instances by id, built once from a factory and reused (one SDK client each)."""

    def __init__(self, factory: Callable[[str], BaseLLMProvider] | None = None) -> None:
        self._factory = factory or create
        self._instances: dict[str, BaseLLMProvider] = {}

    def get(self, provider_id: str) -> BaseLLMProvider:
        instance = self._instances.get(provider_id)
        if instance is None:
            instance = self._factory(provider_id)
            self._instances[provider_id] = instance
        return instance

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
