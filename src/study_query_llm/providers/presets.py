"""How each OpenAI-compatible provider differs from the others (no SDK import: the registry
reads these to list providers without loading the `openai` package)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ListingStyle = Literal["openai", "azure_deployments", "ollama_tags"]


@dataclass(frozen=True)
class Preset:
    """How one OpenAI-compatible provider differs from the others."""

    provider_id: str
    label: str
    key_env_var: str | None
    base_url_env_var: str | None
    default_base_url: str | None = None
    key_required: bool = True
    listing: ListingStyle = "openai"
    default_headers: dict[str, str] = field(default_factory=dict)
    supports_embeddings: bool = True
    supports_json_mode: bool = True
    stream_usage: bool = True
    placeholder_key: str = "not-needed"


PRESETS: dict[str, Preset] = {
    "openai": Preset(
        "openai", "OpenAI", "OPENAI_API_KEY", "OPENAI_BASE_URL", default_base_url=None
    ),
    "azure": Preset(
        "azure",
        "Azure OpenAI",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_ENDPOINT",
        listing="azure_deployments",
    ),
    "hyperbolic": Preset(
        "hyperbolic",
        "Hyperbolic",
        "HYPERBOLIC_API_KEY",
        "HYPERBOLIC_BASE_URL",
        supports_embeddings=False,
    ),
    "openrouter": Preset(
        "openrouter",
        "OpenRouter",
        "OPENROUTER_API_KEY",
        "OPENROUTER_BASE_URL",
        default_headers={"X-Title": "Study Query LLM"},
        supports_embeddings=False,
    ),
    "vllm": Preset("vllm", "vLLM", "VLLM_API_KEY", "VLLM_BASE_URL", key_required=False),
    "lmstudio": Preset(
        "lmstudio", "LM Studio", "LMSTUDIO_API_KEY", "LMSTUDIO_BASE_URL", key_required=False
    ),
    "ollama": Preset(
        "ollama",
        "Ollama",
        "OLLAMA_API_KEY",
        "OLLAMA_BASE_URL",
        key_required=False,
        listing="ollama_tags",
        placeholder_key="ollama",
    ),
}
