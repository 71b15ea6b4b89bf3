"""Provider id → how to build it from settings; which providers are configured; who can do what."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Settings, get_settings
from .anthropic import AnthropicProvider
from .base import BaseLLMProvider
from .errors import MissingCredentialError, ProviderConfigurationError
from .local_minilm import MODEL_ID as MINILM_MODEL
from .local_minilm import LocalMiniLMProvider
from .local_minilm import unavailable_reason as minilm_unavailable
from .mock import MockProvider
from .openai_compatible import PRESETS, OpenAICompatibleProvider

CAPABILITIES = ("chat", "stream", "embeddings", "json_mode")


@dataclass(frozen=True)
class Requirement:
    """A setting the provider cannot work without, and the variable that sets it."""

    field: str
    env_var: str
    override: str  # keyword accepted by `create()` in place of the setting


@dataclass(frozen=True)
class ProviderSpec:
    """Everything the registry knows about one provider id."""

    id: str
    label: str
    requirements: tuple[Requirement, ...]
    model_field: str | None
    capabilities: frozenset[str]
    build: Callable[[Settings, dict[str, Any]], BaseLLMProvider]
    is_mock: bool = False
    fixed_default_model: str | None = None
    # For providers that need no setting but an installed package: why it cannot run.
    unavailable: Callable[[], str | None] | None = None

    def missing(self, settings: Settings, overrides: dict[str, Any] | None = None) -> list[str]:
        """Environment variables still needed, given settings and `create()` overrides."""
        overrides = overrides or {}
        missing = [
            req.env_var
            for req in self.requirements
            if not overrides.get(req.override) and not getattr(settings, req.field)
        ]
        reason = self.unavailable() if self.unavailable else None
        return [*missing, reason] if reason else missing

    def is_configured(self, settings: Settings) -> bool:
        return not self.missing(settings)

    def default_model(self, settings: Settings) -> str | None:
        if self.model_field:
            return getattr(settings, self.model_field)
        return self.fixed_default_model


def _value(settings: Settings, overrides: dict[str, Any], key: str, field: str) -> Any:
    if overrides.get(key) is not None:
        return overrides[key]
    value = getattr(settings, field)
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _openai_family(provider_id: str, prefix: str) -> ProviderSpec:
    preset = PRESETS[provider_id]
    key_field = f"{prefix}_api_key"
    url_field = "azure_openai_endpoint" if provider_id == "azure" else f"{prefix}_base_url"
    model_field = "azure_openai_deployment" if provider_id == "azure" else f"{prefix}_model"
    requirements: list[Requirement] = []
    if preset.key_required:
        requirements.append(Requirement(key_field, preset.key_env_var or "", "api_key"))
    if provider_id in ("azure", "vllm", "lmstudio", "ollama"):
        requirements.append(Requirement(url_field, preset.base_url_env_var or "", "base_url"))

    def build(settings: Settings, overrides: dict[str, Any]) -> BaseLLMProvider:
        return OpenAICompatibleProvider(
            preset,
            api_key=_value(settings, overrides, "api_key", key_field),
            base_url=_value(settings, overrides, "base_url", url_field),
            model=_value(settings, overrides, "model", model_field),
            timeout_s=_value(settings, overrides, "timeout_s", "provider_timeout_s"),
            api_version=(
                _value(settings, overrides, "api_version", "azure_openai_api_version")
                if provider_id == "azure"
                else None
            ),
            name=overrides.get("name"),
            http_client=overrides.get("http_client"),
        )

    caps = {"chat", "stream"}
    if preset.supports_embeddings:
        caps.add("embeddings")
    if preset.supports_json_mode:
        caps.add("json_mode")
    return ProviderSpec(
        provider_id, preset.label, tuple(requirements), model_field, frozenset(caps), build
    )


def _build_anthropic(settings: Settings, overrides: dict[str, Any]) -> BaseLLMProvider:
    return AnthropicProvider(
        api_key=_value(settings, overrides, "api_key", "anthropic_api_key"),
        base_url=_value(settings, overrides, "base_url", "anthropic_base_url"),
        model=_value(settings, overrides, "model", "anthropic_model"),
        timeout_s=_value(settings, overrides, "timeout_s", "provider_timeout_s"),
        default_max_tokens=_value(settings, overrides, "max_tokens", "anthropic_max_tokens"),
        name=overrides.get("name"),
        http_client=overrides.get("http_client"),
    )


def _build_mock(settings: Settings, overrides: dict[str, Any]) -> BaseLLMProvider:
    return MockProvider(
        model=overrides.get("model") or "mock-small",
        latency_ms=_value(settings, overrides, "latency_ms", "mock_latency_ms"),
        failure_rate=_value(settings, overrides, "failure_rate", "mock_failure_rate"),
        permanent_failure_rate=_value(
            settings, overrides, "permanent_failure_rate", "mock_permanent_failure_rate"
        ),
        seed=_value(settings, overrides, "seed", "mock_seed"),
        name=overrides.get("name"),
    )


SPECS: dict[str, ProviderSpec] = {
    spec.id: spec
    for spec in (
        _openai_family("openai", "openai"),
        _openai_family("azure", "azure_openai"),
        _openai_family("hyperbolic", "hyperbolic"),
        _openai_family("openrouter", "openrouter"),
        _openai_family("vllm", "vllm"),
        _openai_family("lmstudio", "lmstudio"),
        _openai_family("ollama", "ollama"),
        ProviderSpec(
            "anthropic",
            "Anthropic",
            (Requirement("anthropic_api_key", "ANTHROPIC_API_KEY", "api_key"),),
            "anthropic_model",
            frozenset({"chat", "stream"}),
            _build_anthropic,
        ),
        ProviderSpec(
            "local-minilm",
            "Local all-MiniLM-L6-v2 (embeddings, offline)",
            (),
            None,
            frozenset({"embeddings"}),
            lambda settings, overrides: LocalMiniLMProvider(name=overrides.get("name")),
            fixed_default_model=MINILM_MODEL,
            unavailable=minilm_unavailable,
        ),
        ProviderSpec(
            "mock",
            "Mock (offline, not a real model)",
            (),
            None,
            frozenset({"chat", "stream", "embeddings", "json_mode"}),
            _build_mock,
            is_mock=True,
            fixed_default_model="mock-small",
        ),
    )
}


class UnknownProviderError(ProviderConfigurationError):
    """No provider has this id."""

    kind = "unknown_provider"


def get_spec(provider_id: str) -> ProviderSpec:
    try:
        return SPECS[provider_id]
    except KeyError:
        raise UnknownProviderError(
            f"unknown provider {provider_id!r}; choose one of {', '.join(SPECS)}"
        ) from None


def create(provider_id: str, settings: Settings | None = None, **overrides: Any) -> BaseLLMProvider:
    """Build a provider. A missing key or endpoint raises an error naming the variable to set.

    Overrides (all optional): api_key, base_url, model, timeout_s, api_version, name,
    http_client; for mock also latency_ms, failure_rate, permanent_failure_rate, seed.
    """
    spec = get_spec(provider_id)
    settings = settings or get_settings()
    missing = spec.missing(settings, overrides)
    if missing:
        needs = " and ".join(m if " " in m else f"set {m}" for m in missing)
        raise MissingCredentialError(
            f"{spec.label} is not configured: {needs}",
            env_var=missing[0] if " " not in missing[0] else None,
            provider=provider_id,
        )
    return spec.build(settings, overrides)


def configured(settings: Settings | None = None) -> list[ProviderSpec]:
    """Providers whose required settings are present, plus `mock` (always, listed last)."""
    settings = settings or get_settings()
    real = [s for s in SPECS.values() if not s.is_mock and s.is_configured(settings)]
    return [*real, SPECS["mock"]]


def supporting(capability: str, settings: Settings | None = None) -> list[ProviderSpec]:
    """Configured providers that offer a capability ("chat", "stream", "embeddings", ...)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; choose one of {CAPABILITIES}")
    return [spec for spec in configured(settings) if capability in spec.capabilities]
