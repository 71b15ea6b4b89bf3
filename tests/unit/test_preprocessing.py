"""Preprocessing: each step does one thing, says so, and never breaks on odd input."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from study_query_llm.services.preprocessing import (
    PreprocessConfig,
    apply_template,
    preprocess,
    scrub_pii,
    strip_control_chars,
)


def test_defaults_clean_controls_and_whitespace_and_record_steps():
    result = preprocess("  Hello\x00\x07   world \u200b\r\n\n\n\nbye\t\t ")
    assert result.sent == "Hello world\n\nbye"
    assert result.original.startswith("  Hello\x00")
    assert result.steps == ["strip_control_chars", "normalise_whitespace"]
    assert result.changed


def _strip_char_by_char(text: str) -> str:
    """The rule, one character at a time: drop Cc and Cf, keep newlines and tabs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(
        ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf")
    )


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_control_characters_of_ascii_text_go_as_the_rule_says(text):
    assert strip_control_chars(text) == _strip_char_by_char(text)


@given(st.text())
def test_control_characters_of_any_text_go_as_the_rule_says(text):
    assert strip_control_chars(text) == _strip_char_by_char(text)


def test_every_ascii_control_is_dropped_but_newline_and_tab():
    every = "".join(chr(c) for c in range(128))
    kept = strip_control_chars(every)
    assert kept == "\t\n\n" + "".join(chr(c) for c in range(32, 127))  # \r became \n


def test_nothing_to_do_records_no_steps():
    result = preprocess("Already clean.")
    assert result.sent == "Already clean."
    assert result.steps == []
    assert not result.changed


def test_template_with_braces_in_prompt_and_template():
    config = PreprocessConfig(template='Answer as JSON {"a": 1}.\nQ: {user_input}')
    result = preprocess("What is {x} in f'{y}' and {0}?", config)
    assert result.sent == "Answer as JSON {\"a\": 1}.\nQ: What is {x} in f'{y}' and {0}?"
    assert "template" in result.steps


def test_template_without_placeholder_is_rejected():
    with pytest.raises(ValidationError, match="user_input"):
        PreprocessConfig(template="no placeholder here")


def test_template_placeholder_inside_user_text_is_not_expanded_again():
    assert apply_template("<{user_input}>", "{user_input}") == "<{user_input}>"


def test_truncation_keeps_the_limit_and_adds_the_marker():
    config = PreprocessConfig(max_chars=20, truncation_marker="[cut]")
    result = preprocess("abcdefghij " * 10, config)
    assert len(result.sent) <= 20
    assert result.sent.endswith("[cut]")
    assert result.truncated and "truncate" in result.steps


def test_truncation_happens_before_the_template():
    config = PreprocessConfig(max_chars=10, truncation_marker="…", template="Q: {user_input} A:")
    result = preprocess("x" * 100, config)
    assert result.sent.startswith("Q: ") and result.sent.endswith(" A:")
    assert len(result.sent) == len("Q:  A:") + 10


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("mail me at jane.doe+lab@example.co.uk today", "EMAIL"),
        ("call +44 20 7946 0958 now", "PHONE"),
        ("call (555) 123-4567 now", "PHONE"),
        ("pay to DE89 3704 0044 0532 0130 00 please", "IBAN"),
        ("pay to GB82WEST12345698765432 please", "IBAN"),
        ("card 4111 1111 1111 1111 exp", "CARD"),
        ("card 5500-0000-0000-0004 exp", "CARD"),
    ],
)
def test_pii_is_scrubbed_with_a_typed_placeholder(text, label):
    scrubbed, counts = scrub_pii(text)
    assert f"[{label}]" in scrubbed
    assert counts == {label: 1}


@pytest.mark.parametrize(
    "text",
    [
        "The year 2024 had 366 days.",
        "Version 3.11.7 is installed.",
        "Order 1234 5678 9012 3456 fails Luhn",  # not a valid card number
        "DE00 0000 0000 0000 0000 00 is not a valid IBAN",
    ],
)
def test_ordinary_numbers_are_left_alone(text):
    scrubbed, counts = scrub_pii(text)
    assert counts.get("CARD", 0) == 0 and counts.get("IBAN", 0) == 0
    if "year" in text or "Version" in text:
        assert scrubbed == text


def test_scrub_step_is_visible_in_the_result():
    result = preprocess("write to a@b.org", PreprocessConfig(scrub_pii=True))
    assert result.sent == "write to [EMAIL]"
    assert result.redactions == {"EMAIL": 1}
    assert result.to_json()["redactions"] == {"EMAIL": 1}


def test_unknown_config_field_is_rejected():
    with pytest.raises(ValidationError, match="shout"):
        PreprocessConfig(shout=True)
