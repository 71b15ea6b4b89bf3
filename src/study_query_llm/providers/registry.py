"""Provider id → how to build it from settings; which providers are configured; who can do what."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings, get_settings
from .base import BaseLLMProvider
from .errors import MissingCredentialError, ProviderConfigurationError
from .group import GROUP_PREFIX, GroupConfig, TargetConfig, build_group, group_name
from .local_minilm import MODEL_ID as MINILM_MODEL
from .local_minilm import LocalMiniLMProvider
from .local_minilm import unavailable_reason as minilm_unavailable
from .mock import MockProvider
from .presets import PRESETS

CAPABILITIES = ("chat", "stream", "embeddings", "json_mode")

log = logging.getLogger(__name__)


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
        from .openai_compatible import OpenAICompatibleProvider  # the SDK loads on first use

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
    from .anthropic import AnthropicProvider  # the SDK loads on first use

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


# --- provider groups ("group:NAME") ----------------------------------------------------------


def _env_value(name: str) -> str | None:
    """A variable from the environment, else from `.env` (keys never live in group files)."""
    value = os.environ.get(name)
    if value is None and Path(".env").is_file():
        from dotenv import dotenv_values

        value = dotenv_values(".env").get(name)
    return value or None


def _target_key(target: TargetConfig) -> str | None:
    """The target's own key, from the variable its `api_key_env` names."""
    if not target.api_key_env:
        return None
    value = _env_value(target.api_key_env)
    if not value:
        raise MissingCredentialError(
            f"target {target.key} needs its key: set {target.api_key_env}",
            env_var=target.api_key_env,
            provider=target.provider,
        )
    return value


def _build_target(settings: Settings, target: TargetConfig) -> BaseLLMProvider:
    overrides: dict[str, Any] = {"model": target.model}
    if target.base_url:
        overrides["base_url"] = target.base_url
    if target.timeout_s:
        overrides["timeout_s"] = target.timeout_s
    key = _target_key(target)
    if key:
        overrides["api_key"] = key
    return create(target.provider, settings, **overrides)


def _group_spec(config: GroupConfig, settings: Settings) -> ProviderSpec:
    target_specs = [SPECS.get(t.provider) for t in config.targets]
    unknown = [t.provider for t, spec in zip(config.targets, target_specs, strict=True) if not spec]
    if unknown:
        raise UnknownProviderError(
            f"group {config.name!r}: unknown provider {unknown[0]!r} in its targets; "
            f"choose one of {', '.join(SPECS)}"
        )
    known = [spec for spec in target_specs if spec is not None]

    def target_missing(target: TargetConfig, spec: ProviderSpec) -> list[str]:
        overrides: dict[str, Any] = {"base_url": target.base_url}
        if target.api_key_env:
            overrides["api_key"] = _env_value(target.api_key_env)
            if not overrides["api_key"]:
                return [target.api_key_env]
        return spec.missing(settings, overrides)

    def unavailable() -> str | None:
        missing = [target_missing(t, spec) for t, spec in zip(config.targets, known, strict=True)]
        if any(not m for m in missing):
            return None
        needs = sorted({name for names in missing for name in names})
        return f"set {' or '.join(needs)} for one of its targets"

    def build(build_settings: Settings, overrides: dict[str, Any]) -> BaseLLMProvider:
        from .config_file import load_providers_config
        from .pricing import PricingTable

        loaded = load_providers_config(build_settings)
        extra = {k: overrides[k] for k in ("state", "clock", "sleep", "rng") if k in overrides}
        return build_group(
            config,
            build_target=lambda target: _build_target(build_settings, target),
            capabilities=loaded.capabilities,
            pricing=PricingTable(build_settings.pricing_table_overrides()),
            **extra,
        )

    caps = {"chat", "stream"}
    if any("json_mode" in spec.capabilities for spec in known):
        caps.add("json_mode")
    return ProviderSpec(
        id=config.provider_id,
        label=f"Group {config.name} ({config.strategy}, {_plural(len(config.targets), 'target')})",
        requirements=(),
        model_field=None,
        capabilities=frozenset(caps),
        build=build,
        is_mock=all(spec.is_mock for spec in known),
        fixed_default_model="auto",
        unavailable=unavailable,
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def group_specs(settings: Settings | None = None) -> list[ProviderSpec]:
    """A spec per configured provider group; a configuration error is raised as one line."""
    from .config_file import load_providers_config

    settings = settings or get_settings()
    try:
        groups = load_providers_config(settings).groups
    except ValueError as exc:
        raise ProviderConfigurationError(str(exc), env_var="PROVIDER_GROUPS_FILE") from None
    return [_group_spec(config, settings) for config in groups.values()]


def get_spec(provider_id: str, settings: Settings | None = None) -> ProviderSpec:
    name = group_name(provider_id)
    if name is not None:
        specs = {spec.id: spec for spec in group_specs(settings)}
        if provider_id not in specs:
            known = ", ".join(specs) or "none (set PROVIDER_GROUPS or PROVIDER_GROUPS_FILE)"
            raise UnknownProviderError(f"unknown provider group {name!r}; configured: {known}")
        return specs[provider_id]
    try:
        return SPECS[provider_id]
    except KeyError:
        raise UnknownProviderError(
            f"unknown provider {provider_id!r}; choose one of {', '.join(SPECS)}"
            f" (or {GROUP_PREFIX}NAME for a provider group)"
        ) from None


def create(provider_id: str, settings: Settings | None = None, **overrides: Any) -> BaseLLMProvider:
    """Build a provider. A missing key or endpoint raises an error naming the variable to set.

    Overrides (all optional): api_key, base_url, model, timeout_s, api_version, name,
    http_client; for mock also latency_ms, failure_rate, permanent_failure_rate, seed;
    for a provider group ("group:NAME") state, clock, sleep, rng.
    """
    settings = settings or get_settings()
    spec = get_spec(provider_id, settings)
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
    try:
        groups = [s for s in group_specs(settings) if s.is_configured(settings)]
    except ProviderConfigurationError as exc:
        log.warning("provider groups are not available: %s", exc)
        groups = []
    return [*real, *groups, SPECS["mock"]]


def supporting(capability: str, settings: Settings | None = None) -> list[ProviderSpec]:
    """Configured providers that offer a capability ("chat", "stream", "embeddings", ...)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; choose one of {CAPABILITIES}")
    return [spec for spec in configured(settings) if capability in spec.capabilities]
