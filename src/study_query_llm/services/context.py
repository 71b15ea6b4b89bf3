"""Wire the services together from settings: one engine, one recorder, the services on top.

```python
async with open_services(settings) as services:
    result = await services.inference.run("Hello", provider="mock")
```
The database is brought to the newest schema first (never dropped or recreated).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from sqlalchemy import Engine

from ..config import Settings, get_settings
from ..db import migrate
from ..db.connection import get_engine
from ..providers import create
from ..providers.pricing import PricingTable
from ._common import MODEL_MEMORY, ProviderPool
from .conversation import ConversationService
from .embedding import EmbeddingService
from .inference import InferenceService, RetryPolicy
from .jobs import BatchService
from .recorder import CallRecorder


@dataclass
class Services:
    """Everything a front end (CLI, dashboard, notebook) needs, sharing one engine."""

    settings: Settings
    engine: Engine
    recorder: CallRecorder
    inference: InferenceService
    batches: BatchService
    conversations: ConversationService
    embeddings: EmbeddingService

    async def aclose(self) -> None:
        await self.inference.aclose()
        await self.embeddings.aclose()


def build_services(
    settings: Settings | None = None,
    *,
    retry: RetryPolicy | None = None,
    migrate_first: bool = True,
) -> Services:
    """Build the services (call from a thread or before the event loop starts)."""
    settings = settings or get_settings()
    if migrate_first:
        migrate.upgrade(settings.database_url)
    engine = get_engine(settings.database_url)
    pricing = PricingTable(settings.pricing_table_overrides())
    # One client per provider, shared by the services; what calls learn about models
    # (a 404 for a deployment) is shared by every pool in the process.
    pool = ProviderPool(partial(create, settings=settings), models=MODEL_MEMORY)
    recorder = CallRecorder(engine)
    inference = InferenceService(recorder, providers=pool, pricing=pricing, retry=retry)
    return Services(
        settings=settings,
        engine=engine,
        recorder=recorder,
        inference=inference,
        batches=BatchService(engine, inference),
        conversations=ConversationService(engine, inference),
        embeddings=EmbeddingService(engine, providers=pool, pricing=pricing, retry=retry),
    )


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings | None = None, *, retry: RetryPolicy | None = None
) -> AsyncIterator[Services]:
    """Build the services off the event loop, and close them (flushing records) after."""
    services = await asyncio.to_thread(build_services, settings, retry=retry)
    try:
        yield services
    finally:
        await services.aclose()
