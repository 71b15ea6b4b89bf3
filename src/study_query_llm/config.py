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

    # --- provider groups, capabilities, model listings -----------------------------------
    provider_groups_file: str | None = Field(
        None, description="TOML/YAML/JSON file with [groups], [capabilities], [listing_rules]."
    )
    provider_groups: str | None = Field(
        None, description='JSON: {"name": {"strategy": "failover", "targets": [...]}, ...}.'
    )
    capability_overrides: str | None = Field(
        None, description='JSON: {"model regex": {"features": [...], "strengths": {...}}}.'
    )
    model_listing_rules: str | None = Field(
        None, description='JSON: {"provider id": {"selector": "...", "fields": {...}}}.'
    )
    model_listing_ttl_s: float = Field(300.0, ge=0, description="Model listing cache (seconds).")

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
    log_format: str = Field("text", pattern="^(text|json)$", description="text or json lines.")
    log_prompts: bool = Field(False, description="Put prompt and response text in log lines.")

    # --- dashboard server ----------------------------------------------------------------
    panel_address: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: all).")
    panel_port: int = Field(5006, ge=1, le=65535, description="Port of the dashboard.")
    panel_allow_websocket_origin: str | None = Field(
        None, description="Comma-separated host[:port] browsers may connect from."
    )
    panel_num_procs: int = Field(1, ge=0, description="Server processes (0: one per CPU).")
    panel_use_xheaders: bool = Field(False, description="Trust X-Forwarded-* from a proxy.")
    upload_max_bytes: int = Field(5 * 1024 * 1024, gt=0, description="Largest prompts upload.")
    upload_max_prompts: int = Field(50_000, gt=0, description="Most prompts in one batch.")

    # --- sign-in (off unless AUTH_USERS or PANEL_OAUTH_PROVIDER is set) -----------------
    auth_users: SecretStr | None = Field(None, description="user:pbkdf2 hash pairs.")
    panel_cookie_secret: SecretStr | None = None
    panel_oauth_provider: str | None = None
    panel_oauth_key: str | None = None
    panel_oauth_secret: SecretStr | None = None
    panel_oauth_redirect_uri: str | None = None
    panel_oauth_extra_params: str | None = None
    panel_oauth_encryption: SecretStr | None = None

    @field_validator(
        "log_format",
        "panel_allow_websocket_origin",
        "auth_users",
        "panel_cookie_secret",
        "panel_oauth_provider",
        "panel_oauth_key",
        "panel_oauth_secret",
        "panel_oauth_redirect_uri",
        "panel_oauth_extra_params",
        "panel_oauth_encryption",
        mode="before",
    )
    @classmethod
    def _blank_server_setting_is_none(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return "text" if info.field_name == "log_format" else None
        return value.strip().lower() if info.field_name == "log_format" else value

    def websocket_origins(self, port: int) -> list[str]:
        """Hosts whose pages may open the dashboard's websocket (default: this machine)."""
        if self.panel_allow_websocket_origin:
            return [o.strip() for o in self.panel_allow_websocket_origin.split(",") if o.strip()]
        return [f"localhost:{port}", f"127.0.0.1:{port}"]

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
        "provider_groups_file",
        "provider_groups",
        "capability_overrides",
        "model_listing_rules",
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
