"""The command line: answers with metadata, lists providers, and fails in one clear line."""

from __future__ import annotations

import json

import pytest

from study_query_llm.cli import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env from the repository
    monkeypatch.setenv("MOCK_LATENCY_MS", "0")


def test_ask_prints_answer_and_metadata(capsys):
    assert main(["ask", "--provider", "mock", "Why is the sky blue?"]) == 0
    out = capsys.readouterr().out
    assert "Mock answer about" in out
    assert "provider: mock (mock provider, not a real model)" in out
    assert "model: mock-small" in out
    assert "tokens:" in out and "latency:" in out and "cost: $0.000000" in out


def test_ask_json_is_machine_readable(capsys):
    assert main(["ask", "--json", "-m", "mock-large", "--temperature", "0.3", "hello"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["provider"] == "mock"
    assert data["model"] == "mock-large"
    assert data["total_tokens"] == data["prompt_tokens"] + data["completion_tokens"]
    assert data["cost_usd"] == 0.0


def test_ask_stream_prints_the_same_answer(capsys):
    assert main(["ask", "--json", "hello there"]) == 0
    expected = json.loads(capsys.readouterr().out)["text"]
    assert main(["ask", "--stream", "hello there"]) == 0
    assert capsys.readouterr().out.startswith(expected + "\n")


def test_ask_reads_prompt_from_stdin(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert main(["ask", "-"]) == 0
    assert "from stdin" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["ask", "--provider", "openai", "hi"], 2, "set OPENAI_API_KEY"),
        (["ask", "--provider", "nope", "hi"], 2, "unknown provider 'nope'"),
        (["ask", "--temperature", "9", "hi"], 1, "temperature"),
        (["ask", "--max-tokens", "many", "hi"], 2, "invalid int value"),
        (["ask", "   "], 2, "the prompt is empty"),
        (["ask", "-m", "gpt-4o", "hi"], 1, "unknown mock model"),
        (["frobnicate"], 2, "invalid choice"),
        ([], 2, "required"),
    ],
)
def test_bad_arguments_give_one_line_and_non_zero_exit(capsys, argv, code, message):
    assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in captured.err + captured.out


def test_providers_lists_mock_and_what_to_set(capsys):
    assert main(["providers"]) == 0
    out = capsys.readouterr().out
    assert "mock" in out and "mock-small" in out
    assert "OPENAI_API_KEY" in out
    assert "ANTHROPIC_API_KEY" in out


def test_providers_json_lists_configured_ones(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    assert main(["providers", "--json", "--no-models"]) == 0
    assert "sk-secret-value" not in capsys.readouterr().out
    assert main(["providers", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    ids = [row["id"] for row in data["configured"]]
    assert ids[0] == "openai" and ids[-1] == "mock"
    assert "models_error" in data["configured"][0]  # unreachable: reported, not raised
    assert "sk-secret-value" not in out


def test_invalid_setting_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("MOCK_FAILURE_RATE", "lots")
    assert main(["ask", "hi"]) == 2
    assert "MOCK_FAILURE_RATE" in capsys.readouterr().err
