"""The registry: what is configured, what is missing, and who can do what."""

from __future__ import annotations

import pytest

from study_query_llm.config import Settings
from study_query_llm.providers import MissingCredentialError, configured, create, supporting
from study_query_llm.providers.anthropic import AnthropicProvider
from study_query_llm.providers.local_minilm import unavailable_reason
from study_query_llm.providers.mock import MockProvider
from study_query_llm.providers.openai_compatible import OpenAICompatibleProvider
from study_query_llm.providers.registry import SPECS, UnknownProviderError

# The local embedding model appears whenever its optional extra is installed.
LOCAL = [] if unavailable_reason() else ["local-minilm"]

ALL = {"openai", "azure", "hyperbolic", "openrouter", "vllm", "lmstudio", "ollama", "anthropic"}


def test_every_provider_is_registered():
    assert set(SPECS) == ALL | {"mock", "local-minilm"}


def test_nothing_configured_lists_only_mock_and_local_models(settings):
    assert [spec.id for spec in configured(settings)] == [*LOCAL, "mock"]


def test_configured_when_required_settings_are_present():
    settings = Settings(
        _env_file=None,
        openai_api_key="sk-x",
        azure_openai_api_key="az",  # endpoint missing -> not configured
        ollama_base_url="http://127.0.0.1:11434/v1",
    )
    assert [spec.id for spec in configured(settings)] == ["openai", "ollama", *LOCAL, "mock"]


@pytest.mark.parametrize(
    ("provider_id", "variable"),
    [
        ("openai", "OPENAI_API_KEY"),
        ("azure", "AZURE_OPENAI_API_KEY"),
        ("hyperbolic", "HYPERBOLIC_API_KEY"),
        ("openrouter", "OPENROUTER_API_KEY"),
        ("anthropic", "ANTHROPIC_API_KEY"),
        ("vllm", "VLLM_BASE_URL"),
        ("lmstudio", "LMSTUDIO_BASE_URL"),
        ("ollama", "OLLAMA_BASE_URL"),
    ],
)
def test_using_an_unconfigured_provider_names_the_variable(settings, provider_id, variable):
    with pytest.raises(MissingCredentialError) as info:
        create(provider_id, settings)
    assert variable in str(info.value)
    assert info.value.env_var == variable


def test_azure_needs_both_key_and_endpoint():
    settings = Settings(_env_file=None, azure_openai_api_key="k")
    with pytest.raises(MissingCredentialError, match="AZURE_OPENAI_ENDPOINT"):
        create("azure", settings)


def test_unknown_provider_lists_the_known_ones(settings):
    with pytest.raises(UnknownProviderError, match="openai"):
        create("nope", settings)


async def test_create_builds_the_right_class_and_overrides_win(settings):
    openai_like = create("vllm", settings, base_url="http://127.0.0.1:9/v1", model="m")
    assert isinstance(openai_like, OpenAICompatibleProvider)
    assert openai_like.default_model == "m"
    claude = create("anthropic", settings, api_key="k")
    assert isinstance(claude, AnthropicProvider)
    mock = create("mock", settings, latency_ms=0)
    assert isinstance(mock, MockProvider)
    for provider in (openai_like, claude, mock):
        await provider.aclose()


async def test_sdk_providers_send_through_the_sdks_aiohttp_transport(settings):
    """Both SDKs' own aiohttp-backed client (less CPU per call than the default httpx
    transport), unless a client is given; the contract tests run every wire through it."""
    import anthropic
    import httpx2
    import openai

    openai_like = create("vllm", settings, base_url="http://127.0.0.1:9/v1", model="m")
    claude = create("anthropic", settings, api_key="k")
    given = httpx2.AsyncClient()
    chosen = create("vllm", settings, base_url="http://127.0.0.1:9/v1", http_client=given)
    try:
        assert isinstance(openai_like._client._client, openai.DefaultAioHttpClient)
        assert isinstance(claude._client._client, anthropic.DefaultAioHttpClient)
        assert chosen._client._client is given
    finally:
        for provider in (openai_like, claude, chosen):
            await provider.aclose()


async def test_secret_never_in_provider_repr(settings):
    provider = create("openai", settings, api_key="sk-supersecret")
    assert "sk-supersecret" not in repr(provider)
    await provider.aclose()


def test_capability_lookup():
    settings = Settings(_env_file=None, openai_api_key="k", anthropic_api_key="k")
    assert [s.id for s in supporting("embeddings", settings)] == ["openai", *LOCAL, "mock"]
    assert [s.id for s in supporting("chat", settings)] == ["openai", "anthropic", "mock"]
    with pytest.raises(ValueError, match="capability"):
        supporting("teleport", settings)


def test_provider_sdks_load_only_for_providers_in_use():
    """The OpenAI and Anthropic SDKs take ~65 MB of memory; a dashboard or CLI that only
    uses the mock provider never loads them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import panel_app.app\n"
        "from study_query_llm.config import Settings\n"
        "from study_query_llm.providers import configured, create\n"
        "configured(Settings())\n"
        "create('mock', Settings())\n"
        "print(sorted(m for m in ('openai', 'anthropic') if m in sys.modules))\n"
        "create('vllm', Settings(vllm_base_url='http://127.0.0.1:9/v1'))\n"
        "print(sorted(m for m in ('openai', 'anthropic') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split("\n")
    assert out[:2] == ["[]", "['openai']"]
