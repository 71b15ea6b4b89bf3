"""Full-text search: literal matching of awkward input, ranking, snippets, filters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.errors import InvalidSearchError
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.records import NewCall
from study_query_llm.db.search import HIGHLIGHT_END, HIGHLIGHT_START, SearchHit

CORPUS = {
    "percent": "We are 100% sure about it",
    "thousand": "There were 1000 items and 100 percent of them",
    "underscore": "the variable a_b holds it",
    "no_underscore": "the variables axb and a-b",
    "quotes": 'she said "hello there" and it\'s fine',
    "sql": "text about '; DROP TABLE raw_calls; -- injections",
    "near": "NEAR the river OR the lake* in (parens) and col:umn ^caret",
    "emoji": "launch 🚀🚀🚀 today 😀",
    "cyrillic": "Привет, мир! Как дела?",
    "cjk": "日本語のテキストです",
    "backslash": r"a path C:\temp\new and 50\% off",
}


@pytest.fixture
def corpus(engine: Engine, make_call: Callable[..., NewCall]) -> dict[str, int]:
    """Record one call per CORPUS text (as the prompt); returns name -> call id."""
    with UnitOfWork(engine) as uow:
        ids = uow.calls.add_many(
            [make_call(prompt=text, response="ok", provider=name) for name, text in CORPUS.items()]
        )
        uow.commit()
    return dict(zip(CORPUS, ids, strict=True))


def _search(engine: Engine, text: str, **kwargs: object) -> list[SearchHit]:
    with UnitOfWork(engine) as uow:
        return uow.calls.search(text, **kwargs)  # type: ignore[arg-type]


def _names(engine: Engine, corpus: dict[str, int], text: str) -> set[str]:
    by_id = {v: k for k, v in corpus.items()}
    return {by_id[hit.call_id] for hit in _search(engine, text)}


LITERAL_CASES = {
    "100%": {"percent"},
    "100": {"percent", "thousand"},
    "a_b": {"underscore"},
    "%": {"percent", "backslash"},
    "_": {"underscore", "sql"},  # "raw_calls" has one too
    '"hello there"': {"quotes"},
    '"': {"quotes"},
    "it's": {"quotes"},
    "'; DROP TABLE raw_calls; --": {"sql"},
    "NEAR": {"near"},
    "OR lake*": {"near"},
    "*": {"near"},
    "(parens)": {"near"},
    "col:umn": {"near"},
    "^caret": {"near"},
    "🚀🚀🚀": {"emoji"},
    "😀": {"emoji"},
    "Привет": {"cyrillic"},
    "привет мир": {"cyrillic"},
    "日本語": {"cjk"},
    "日本": {"cjk"},
    "テキ": {"cjk"},
    "\\temp": {"backslash"},
    "50\\%": {"backslash"},
    "C:\\": {"backslash"},
    "no such words": set(),
}


@pytest.mark.parametrize("text", LITERAL_CASES, ids=list(LITERAL_CASES))
def test_user_text_matches_literally(engine: Engine, corpus: dict[str, int], text: str) -> None:
    assert _names(engine, corpus, text) == LITERAL_CASES[text]


def test_sql_injection_text_changes_nothing(engine: Engine, corpus: dict[str, int]) -> None:
    for text in ("'; DROP TABLE raw_calls; --", "x'); DELETE FROM raw_calls; --", "\\'"):
        _search(engine, text)
    with UnitOfWork(engine) as uow:
        assert uow.calls.count() == len(CORPUS)


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "\u3000"])
def test_empty_search_is_a_clear_error(engine: Engine, text: str) -> None:
    with pytest.raises(InvalidSearchError, match="empty"):
        _search(engine, text)
    assert issubclass(InvalidSearchError, ValueError)


def test_too_long_search_text_is_a_clear_error(engine: Engine) -> None:
    with pytest.raises(InvalidSearchError, match="limit"):
        _search(engine, "x" * 1_000_001)


def test_one_megabyte_texts_are_indexed_and_snippets_stay_short(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    filler = "lorem ipsum dolor sit amet " * 40_000  # ~1 MB
    big_prompt = filler + " the hidden needle_Ω here " + filler[:1000]
    big_response = "Ω" + "z" * 1_000_000 + " tail-marker"
    with UnitOfWork(engine) as uow:
        big_id = uow.calls.add(make_call(prompt=big_prompt, response=big_response))
        uow.calls.add(make_call(prompt="small needle_ text"))
        uow.commit()

    hits = _search(engine, "needle_Ω")
    assert [h.call_id for h in hits] == [big_id]
    snippet = hits[0].prompt_snippet
    assert f"{HIGHLIGHT_START}needle_Ω{HIGHLIGHT_END}" in snippet
    assert len(snippet) < 200 and snippet.startswith("…") and snippet.endswith("…")

    assert [h.call_id for h in _search(engine, "tail-marker")] == [big_id]
    assert [h.call_id for h in _search(engine, "ne Ω")] == [big_id]  # short-term fallback


def test_every_term_must_match_somewhere_in_prompt_or_response(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        both, prompt_only, _ = uow.calls.add_many(
            [
                make_call(prompt="tell me about penguins", response="they live in Antarctica"),
                make_call(prompt="tell me about penguins", response="no idea"),
                make_call(prompt="antarctica facts", response="cold"),
            ]
        )
        uow.commit()
    assert [h.call_id for h in _search(engine, "PENGUINS antarctica")] == [both]
    assert {h.call_id for h in _search(engine, "penguins")} == {both, prompt_only}


def test_all_request_shapes_are_searchable(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    requests = {
        "system": {"system": "sysword", "messages": [{"role": "user", "content": "hi"}]},
        "parts": {
            "messages": [
                {"role": "system", "content": "first"},
                {"role": "user", "content": [{"type": "text", "text": "partword"}]},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                "not a message object",
            ]
        },
        "prompt": {"prompt": "promptword", "options": {"temperature": 0}},
        "input": {"input": ["embedding one", "inputword"]},
        "odd": {"messages": "not a list", "prompt": {"nested": "ignored"}},
    }
    with UnitOfWork(engine) as uow:
        ids = dict(
            zip(
                requests,
                uow.calls.add_many(
                    [make_call(request_json=r, response=None) for r in requests.values()]
                ),
                strict=True,
            )
        )
        uow.commit()
    for name, word in (
        ("system", "sysword"),
        ("parts", "partword"),
        ("prompt", "promptword"),
        ("input", "inputword"),
    ):
        hits = _search(engine, word)
        assert [h.call_id for h in hits] == [ids[name]]
        assert f"{HIGHLIGHT_START}{word}{HIGHLIGHT_END}" in hits[0].prompt_snippet
        assert hits[0].response_snippet == ""
    assert _search(engine, "temperature") == []  # options are not prompt text
    assert _search(engine, "ignored") == []


def test_snippets_mark_matches_in_prompt_and_response(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        call_id = uow.calls.add(
            make_call(prompt="Where is the Kiwi bird from?", response="The kiwi is from NZ.")
        )
        uow.commit()
    (hit,) = _search(engine, "kiwi")
    assert hit.call_id == call_id
    assert hit.prompt_snippet == f"Where is the {HIGHLIGHT_START}Kiwi{HIGHLIGHT_END} bird from?"
    assert hit.response_snippet == f"The {HIGHLIGHT_START}kiwi{HIGHLIGHT_END} is from NZ."
    assert (hit.provider, hit.model, hit.status) == ("mock", "mock-1", "success")
    assert hit.created_at.tzinfo is not None

    (short,) = _search(engine, "NZ")  # 2 characters: the LIKE fallback path
    assert short.response_snippet == f"The kiwi is from {HIGHLIGHT_START}NZ{HIGHLIGHT_END}."


def test_ranking_prefers_more_matches_and_ties_go_to_the_newest(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        weak, strong, tie_old, tie_new = uow.calls.add_many(
            [
                make_call(prompt="mango " + "other words to dilute the match " * 20),
                make_call(prompt="mango mango mango, all about mango"),
                make_call(prompt="zz1", response="same"),
                make_call(prompt="zz1", response="same"),
            ]
        )
        uow.commit()
    hits = _search(engine, "mango")
    assert [h.call_id for h in hits] == [strong, weak]
    assert hits[0].rank > hits[1].rank
    assert [h.call_id for h in _search(engine, "zz1")] == [tie_new, tie_old]


def test_search_applies_filters_and_limit(
    engine: Engine, make_call: Callable[..., NewCall]
) -> None:
    with UnitOfWork(engine) as uow:
        ids = uow.calls.add_many(
            [make_call(prompt=f"shared topic {i}", provider=f"p{i % 3}") for i in range(30)]
        )
        group = uow.groups.create("label", "searchable")
        uow.groups.add_members(group.id, ids[:4])
        uow.commit()
    with UnitOfWork(engine) as uow:
        assert len(uow.calls.search("shared topic")) == 30
        assert len(uow.calls.search("shared topic", limit=7)) == 7
        by_provider = uow.calls.search("shared topic", CallFilters(providers=("p1",)))
        assert {h.provider for h in by_provider} == {"p1"} and len(by_provider) == 10
        in_group = uow.calls.search("topic", CallFilters(group_id=group.id))
        assert {h.call_id for h in in_group} == set(ids[:4])
        assert uow.calls.search("to", CallFilters(group_id=group.id, status="failed")) == []
        with pytest.raises(ValueError, match="limit"):
            uow.calls.search("topic", limit=0)


SHAPES: dict[str, tuple[dict[str, object], str]] = {
    "chat": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "hi\nyo",
    ),
    "everything": (
        {
            "input": "d",
            "messages": [{"content": [{"type": "text", "text": "b"}, {"text": "c"}]}],
            "prompt": ["p1", "p2"],
            "system": [{"type": "text", "text": "s"}],
        },
        "s\np1\np2\nb\nc\nd",
    ),
    "lone object": ({"system": {"text": "sys"}, "messages": {"content": "one"}}, "sys\none"),
    "no text": (
        {
            "messages": ["str", 3, None, {"content": 5}, {"content": [{"image": "x"}, [1]]}],
            "prompt": {"nested": "no"},
            "input": [1.5, True],
            "options": {"text": "not a prompt field"},
        },
        "",
    ),
    "unicode": ({"prompt": 'Привет "мир" 😀 \\ \t日本'}, 'Привет "мир" 😀 \\ \t日本'),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_both_databases_extract_the_same_prompt_text(engine: Engine, shape: str) -> None:
    from sqlalchemy import text

    request, expected = SHAPES[shape]
    with UnitOfWork(engine) as uow:
        call_id = uow.calls.add(
            NewCall(provider="p", model="m", request_json=request, response_json={"text": 7})
        )
        row = uow.session.execute(
            text("SELECT prompt_text, response_text FROM raw_call_search_text WHERE id = :id"),
            {"id": call_id},
        ).one()
    assert tuple(row) == (expected, "")  # a non-string response "text" is not text
