"""Settings from the environment and `.env`: database, provider keys and endpoints, app options.

API keys are `SecretStr`: they never appear in `repr()`, logs or error messages. Use
`settings.secret("openai_api_key")` to get the plain value at the one place that needs it
(the SDK client constructor).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./data/study_query_llm.db"


class Settings(BaseSettings):
    """Every setting of the project. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    # --- storage -------------------------------------------------------------------------
    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL: sqlite:///path.db or postgresql+psycopg://user@host/db.",
    )

    # --- provider calls ------------------------------------------------------------------
    provider_timeout_s: float = Field(60.0, gt=0, description="Per-request timeout (seconds).")
    pricing_overrides: str | None = Field(
        None,
        description='JSON: {"model": [input_usd_per_mtok, output_usd_per_mtok], ...}.',
    )

    # --- OpenAI --------------------------------------------------------------------------
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"

    # --- Azure OpenAI --------------------------------------------------------------------
    azure_openai_api_key: SecretStr | None = None
    azure_openai_endpoint: str | None = None
    azure_openai_deployment: str | None = None
    azure_openai_api_version: str = "2024-10-21"

    # --- Hyperbolic ----------------------------------------------------------------------
    hyperbolic_api_key: SecretStr | None = None
    hyperbolic_base_url: str = "https://api.hyperbolic.xyz/v1"
    hyperbolic_model: str = "meta-llama/Llama-3.3-70B-Instruct"

    # --- OpenRouter ----------------------------------------------------------------------
    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    openrouter_model: str = "openai/gpt-4o-mini"

    # --- Anthropic -----------------------------------------------------------------------
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    anthropic_model: str = "claude-haiku-4-5"
    anthropic_max_tokens: int = Field(1024, gt=0)

    # --- local OpenAI-compatible servers -------------------------------------------------
    vllm_base_url: str | None = None
    vllm_api_key: SecretStr | None = None
    vllm_model: str | None = None

    lmstudio_base_url: str | None = None
    lmstudio_api_key: SecretStr | None = None
    lmstudio_model: str | None = None

    ollama_base_url: str | None = None
    ollama_api_key: SecretStr | None = None
    ollama_model: str | None = None

    # --- mock provider -------------------------------------------------------------------
    mock_latency_ms: float = Field(50.0, ge=0, description="Mean simulated latency.")
    mock_failure_rate: float = Field(0.0, ge=0, le=1, description="Share of transient failures.")
    mock_permanent_failure_rate: float = Field(
        0.0, ge=0, le=1, description="Share of permanent failures."
    )
    mock_seed: int = Field(0, description="Seed for latency jitter and injected failures.")

    # --- app -----------------------------------------------------------------------------
    log_level: str = "INFO"

    @field_validator(
        "openai_base_url",
        "azure_openai_endpoint",
        "azure_openai_deployment",
        "anthropic_base_url",
        "vllm_base_url",
        "lmstudio_base_url",
        "ollama_base_url",
        "vllm_model",
        "lmstudio_model",
        "ollama_model",
        "pricing_overrides",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        """An empty value in `.env` (``OPENAI_BASE_URL=``) means "not set"."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator(
        "openai_api_key",
        "azure_openai_api_key",
        "hyperbolic_api_key",
        "openrouter_api_key",
        "anthropic_api_key",
        "vllm_api_key",
        "lmstudio_api_key",
        "ollama_api_key",
        mode="before",
    )
    @classmethod
    def _blank_key_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    def secret(self, field: str) -> str | None:
        """The plain value of a `SecretStr` field, or None when unset."""
        value = getattr(self, field)
        if value is None:
            return None
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    def pricing_table_overrides(self) -> dict[str, tuple[float, float]]:
        """Parse PRICING_OVERRIDES; a malformed value is a clear error naming the variable."""
        if not self.pricing_overrides:
            return {}
        try:
            raw = json.loads(self.pricing_overrides)
            return {
                str(model): (float(prices[0]), float(prices[1])) for model, prices in raw.items()
            }
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(
                "PRICING_OVERRIDES must be JSON like "
                '{"my-model": [0.15, 0.60]} (USD per million input/output tokens)'
            ) from exc

    def sqlite_path(self) -> Path | None:
        """The file behind a sqlite URL, if it is one."""
        prefix = "sqlite:///"
        if self.database_url.startswith(prefix):
            return Path(self.database_url[len(prefix) :])
        return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings for this process (read once). Tests build `Settings(...)` directly instead."""
    return Settings()
