"""Settings: secrets stay secret, .env.example documents everything, blanks mean unset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from study_query_llm.config import DEFAULT_DATABASE_URL, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_api_keys_never_appear_in_repr_or_str(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-123")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "ak-very-secret-456")
    settings = Settings(_env_file=None)
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert "sk-very-secret-123" not in text
        assert "ak-very-secret-456" not in text
    assert settings.secret("openai_api_key") == "sk-very-secret-123"


def test_env_example_lists_every_setting_with_a_comment():
    lines = (ROOT / ".env.example").read_text().splitlines()
    documented = {}
    for index, line in enumerate(lines):
        match = re.match(r"^([A-Z0-9_]+)=", line)
        if match:
            documented[match.group(1)] = lines[index - 1]
    for field in Settings.model_fields:
        assert field.upper() in documented, f"{field.upper()} missing from .env.example"
        assert documented[field.upper()].startswith("# "), f"{field.upper()} has no comment"


def test_env_example_values_load_cleanly():
    settings = Settings(_env_file=ROOT / ".env.example")
    assert settings.openai_api_key is None  # blank means unset
    assert settings.vllm_base_url is None
    assert settings.database_url == DEFAULT_DATABASE_URL


def test_default_database_is_a_sqlite_file_under_data():
    settings = Settings(_env_file=None)
    assert settings.database_url.startswith("sqlite:///")
    assert settings.sqlite_path() == Path("./data/study_query_llm.db")


def test_dotenv_file_is_read(tmp_path):
    env = tmp_path / ".env"
    env.write_text("OPENAI_API_KEY=sk-from-file\nMOCK_LATENCY_MS=5\n")
    settings = Settings(_env_file=env)
    assert settings.secret("openai_api_key") == "sk-from-file"
    assert settings.mock_latency_ms == 5


def test_pricing_overrides_parse_and_reject_garbage():
    good = Settings(_env_file=None, pricing_overrides='{"my-model": [1.5, 2]}')
    assert good.pricing_table_overrides() == {"my-model": (1.5, 2.0)}
    bad = Settings(_env_file=None, pricing_overrides="not json")
    with pytest.raises(ValueError, match="PRICING_OVERRIDES"):
        bad.pricing_table_overrides()


def test_invalid_mock_failure_rate_is_rejected():
    with pytest.raises(ValueError, match="mock_failure_rate"):
        Settings(_env_file=None, mock_failure_rate=1.5)
