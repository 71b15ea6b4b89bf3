"""Groups from configuration: the providers file (TOML, YAML, JSON), PROVIDER_GROUPS, registry."""

from __future__ import annotations

import json

import pytest

from study_query_llm.config import Settings
from study_query_llm.providers import (
    MissingCredentialError,
    ProviderConfigurationError,
    configured,
    create,
    supporting,
)
from study_query_llm.providers.config_file import load_providers_config, write_groups
from study_query_llm.providers.group import ProviderGroup
from study_query_llm.providers.registry import UnknownProviderError, get_spec

TOML = """
[groups.fast]
strategy = "round_robin"
mode = "queue"
queue_timeout_s = 30
targets = ["mock:mock-small", {provider = "mock", model = "mock-large", weight = 2, rpm = 600}]

[groups.fast.breaker]
failures = 3
cooldown_s = 10

[capabilities."^mock-large$"]
strengths = { code = "strong" }

[listing_rules.vllm]
selector = "result.models"
fields = { id = "name" }
"""


def settings_with(tmp_path, **values) -> Settings:
    return Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 't.db'}", **values)


def test_a_toml_file_defines_groups_capabilities_and_listing_rules(tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text(TOML)
    settings = settings_with(tmp_path, provider_groups_file=str(path))
    loaded = load_providers_config(settings)
    fast = loaded.groups["fast"]
    assert (fast.strategy, fast.mode, fast.queue_timeout_s) == ("round_robin", "queue", 30)
    assert [t.key for t in fast.targets] == ["mock/mock-small", "mock/mock-large"]
    assert fast.targets[1].rpm == 600 and fast.breaker.failures == 3
    assert loaded.capabilities.for_model("mock-large").strength("code").label == "strong"
    assert loaded.listing_rules["vllm"].selector == "result.models"

    assert [s.id for s in configured(settings)][-2:] == ["group:fast", "mock"]
    assert "group:fast" in [s.id for s in supporting("chat", settings)]
    spec = get_spec("group:fast", settings)
    assert spec.is_mock and spec.default_model(settings) == "auto"
    assert spec.label == "Group fast (round_robin, 2 targets)"
    group = create("group:fast", settings)
    assert isinstance(group, ProviderGroup) and group.name == "group:fast"
    assert group.is_mock


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_yaml_and_json_files_work_and_the_dashboard_can_save_groups_to_them(tmp_path, suffix):
    path = tmp_path / f"providers{suffix}"
    spec = {"strategy": "weighted", "targets": ["mock:mock-small", "mock:mock-large"]}
    write_groups(path, {"duo": spec})
    settings = settings_with(tmp_path, provider_groups_file=str(path))
    assert load_providers_config(settings).groups["duo"].strategy == "weighted"
    write_groups(path, {"duo": {**spec, "strategy": "latency"}, "solo": {"targets": ["mock:m"]}})
    groups = load_providers_config(settings).groups  # re-read: the file changed
    assert groups["duo"].strategy == "latency" and "solo" in groups


def test_saving_refuses_a_toml_file(tmp_path):
    with pytest.raises(ValueError, match=r"only be saved to a \.yaml or \.json file"):
        write_groups(tmp_path / "providers.toml", {})


def test_inline_provider_groups_win_over_the_file(tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text(TOML)
    inline = json.dumps({"fast": {"strategy": "latency", "targets": ["mock:mock-small"]}})
    settings = settings_with(tmp_path, provider_groups_file=str(path), provider_groups=inline)
    assert load_providers_config(settings).groups["fast"].strategy == "latency"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.toml", "[groups.x\n", "PROVIDER_GROUPS_FILE"),
        ("p.toml", "[teams.x]\n", "unknown section 'teams'"),
        ("p.yaml", "groups: [1, 2]\n", "[groups] must be a table"),
        ("p.yaml", "groups:\n  x: {targets: []}\n", "group 'x': targets: List should have"),
        ("p.ini", "[groups]\n", "unknown file type '.ini'"),
        ("p.json", '{"listing_rules": {"v": {"selector": "a[", "fields": {"id": "i"}}}}',
         "selector 'a[' is not valid JMESPath"),
    ],
)  # fmt: skip
def test_a_bad_providers_file_is_one_line_naming_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    settings = settings_with(tmp_path, provider_groups_file=str(path))
    with pytest.raises(ValueError) as info:
        load_providers_config(settings)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    # The rest of the app keeps working: no groups are listed, the error is logged.
    assert [s.id for s in configured(settings)][-1] == "mock"
    with pytest.raises(ProviderConfigurationError, match="PROVIDER_GROUPS_FILE"):
        create("group:x", settings)


def test_a_missing_file_is_named(tmp_path):
    settings = settings_with(tmp_path, provider_groups_file=str(tmp_path / "nope.toml"))
    with pytest.raises(ValueError, match=r"PROVIDER_GROUPS_FILE: .*nope.toml does not exist"):
        load_providers_config(settings)


def test_unknown_groups_and_unknown_target_providers_are_named(tmp_path):
    settings = settings_with(
        tmp_path, provider_groups='{"a": {"targets": ["mock:m"]}, "b": {"targets": ["x:y"]}}'
    )
    with pytest.raises(UnknownProviderError, match="group 'b': unknown provider 'x'"):
        create("group:a", settings)
    good = settings_with(tmp_path, provider_groups='{"a": {"targets": ["mock:m"]}}')
    with pytest.raises(
        UnknownProviderError, match="unknown provider group 'zzz'; configured: group:a"
    ):
        create("group:zzz", good)
    with pytest.raises(UnknownProviderError, match="group:NAME for a provider group"):
        create("nope", good)


def test_a_group_with_no_configured_target_names_the_variables_to_set(tmp_path):
    settings = settings_with(
        tmp_path,
        provider_groups='{"cloud": {"targets": ["openai:gpt-4o", "anthropic:claude-haiku-4-5"]}}',
    )
    assert "group:cloud" not in [s.id for s in configured(settings)]
    with pytest.raises(MissingCredentialError) as info:
        create("group:cloud", settings)
    assert "set ANTHROPIC_API_KEY or OPENAI_API_KEY for one of its targets" in str(info.value)


async def test_a_partly_configured_group_keeps_the_unconfigured_target_out_of_routing(tmp_path):
    settings = settings_with(
        tmp_path,
        provider_groups='{"mixed": {"targets": ["anthropic:claude-haiku-4-5", "mock:mock-small"]}}',
    )
    group = create("group:mixed", settings)
    rows = {row["target"]: row for row in group.status()}
    assert not rows["anthropic/claude-haiku-4-5"]["available"]
    assert "ANTHROPIC_API_KEY" in rows["anthropic/claude-haiku-4-5"]["unavailable"]
    response = await group.complete("hello")
    assert response.metadata["routing"]["target"] == "mock/mock-small"


def test_a_target_key_comes_from_the_variable_it_names(tmp_path, monkeypatch):
    groups = {"k": {"targets": [{"provider": "openai", "model": "gpt-4o", "api_key_env": "K2"}]}}
    settings = settings_with(tmp_path, provider_groups=json.dumps(groups))
    assert "group:k" not in [s.id for s in configured(settings)]
    with pytest.raises(MissingCredentialError, match="set K2"):
        create("group:k", settings)
    monkeypatch.setenv("K2", "sk-from-env")
    assert "group:k" in [s.id for s in configured(settings)]
    group = create("group:k", settings)
    assert "sk-from-env" not in repr(group) and "sk-from-env" not in json.dumps(group.status())
