"""Turning user text into search terms, FTS5 phrases, LIKE patterns and marked snippets."""

from __future__ import annotations

import re

import pytest

from study_query_llm.db.errors import InvalidSearchError
from study_query_llm.db.search import (
    HIGHLIGHT_END,
    HIGHLIGHT_START,
    MAX_QUERY_CHARS,
    MAX_TERMS,
    fts5_query,
    like_pattern,
    mark_terms,
    search_terms,
)


def test_terms_split_on_any_whitespace_and_drop_case_duplicates() -> None:
    assert search_terms("  foo\tBar\nfoo  BAR baz ") == ("foo", "Bar", "baz")
    assert search_terms("Привет привет 日本語") == ("Привет", "日本語")


def test_a_quoted_phrase_is_one_term_and_a_lone_quote_is_a_character() -> None:
    assert search_terms('"ticket #A" open') == ("ticket #A", "open")
    assert search_terms('say "hi  there" 5"') == ("say", "hi  there", '5"')
    assert search_terms('"') == ('"',)
    assert search_terms('"" x') == ('""', "x")


@pytest.mark.parametrize("text", ["", " ", "\n\t", "\u2003\u3000", '" "'])
def test_empty_or_blank_text_is_rejected(text: str) -> None:
    with pytest.raises(InvalidSearchError, match="empty"):
        search_terms(text)


def test_oversized_text_is_rejected() -> None:
    with pytest.raises(InvalidSearchError, match=str(MAX_QUERY_CHARS)):
        search_terms("a" * (MAX_QUERY_CHARS + 1))
    with pytest.raises(InvalidSearchError, match=str(MAX_TERMS)):
        search_terms(" ".join(f"w{i}" for i in range(MAX_TERMS + 1)))


def test_fts5_query_quotes_every_term_as_a_phrase() -> None:
    assert fts5_query(["NEAR", "a*", 'say "hi"', "x OR y"]) == (
        '"NEAR" AND "a*" AND "say ""hi""" AND "x OR y"'
    )


@pytest.mark.parametrize(
    ("term", "pattern"),
    [
        ("100%", r"%100\%%"),
        ("a_b", r"%a\_b%"),
        ("C:\\temp", r"%C:\\temp%"),
        ("50\\%", r"%50\\\%%"),
        ("plain", "%plain%"),
    ],
)
def test_like_patterns_escape_wildcards_and_the_escape_character(term: str, pattern: str) -> None:
    assert like_pattern(term) == pattern


def test_like_patterns_match_only_the_literal_term() -> None:
    def like(value: str, pattern: str) -> bool:  # LIKE semantics, ESCAPE '\'
        regex = "".join(
            ".*" if tok == "%" else "." if tok == "_" else re.escape(tok[-1])
            for tok in re.findall(r"\\.|%|_|.", pattern, flags=re.S)
        )
        return re.fullmatch(regex, value, flags=re.S) is not None

    assert like("we are 100% sure", like_pattern("100%"))
    assert not like("1000 items", like_pattern("100%"))
    assert like("x a_b y", like_pattern("a_b"))
    assert not like("x axb y", like_pattern("a_b"))


def test_marking_is_case_insensitive_and_prefers_longer_terms() -> None:
    marked = mark_terms("Kiwi and KIWIS, kiwifruit", ["kiwi", "kiwis"])
    s, e = HIGHLIGHT_START, HIGHLIGHT_END
    assert marked == f"{s}Kiwi{e} and {s}KIWIS{e}, {s}kiwi{e}fruit"
    assert mark_terms("Привет мир", ["привет"]) == f"{s}Привет{e} мир"
    assert mark_terms("a.b a+b", ["a.b"]) == f"{s}a.b{e} a+b"
    assert mark_terms("", ["x"]) == ""
