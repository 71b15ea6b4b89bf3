"""Reading batch prompts from .txt, .csv and .jsonl files, and the errors for bad ones."""

from __future__ import annotations

import json

import pytest

from study_query_llm.services.prompt_files import PromptFileError, parse_prompts, read_prompts

BOM = b"\xef\xbb\xbf"


# --- good files --------------------------------------------------------------------------


def test_txt_one_prompt_per_line_blank_lines_skipped():
    data = b"First prompt\n\n   Second prompt  \r\nThird {with} braces\n\n"
    assert parse_prompts(data, "p.txt") == ["First prompt", "Second prompt", "Third {with} braces"]


def test_txt_with_bom():
    assert parse_prompts(BOM + b"Hello\nWorld\n", "p.txt") == ["Hello", "World"]


def test_txt_accepts_text_and_uppercase_extension():
    assert parse_prompts("Caf\u00e9 au lait\n", "PROMPTS.TXT") == ["Caf\u00e9 au lait"]


def test_csv_prompt_column_by_header():
    data = b'id,Prompt,notes\n1,What is 2+2?,easy\n2,"Name a colour, any colour",\n'
    assert parse_prompts(data, "p.csv") == ["What is 2+2?", "Name a colour, any colour"]


def test_csv_prefers_the_prompt_column_over_other_text_columns():
    data = b"text,prompt\nnot this,this one\n"
    assert parse_prompts(data, "p.csv") == ["this one"]


@pytest.mark.parametrize("header", ["text", "input", "question"])
def test_csv_other_known_column_names(header: str):
    data = f"id,{header}\n1,Why?\n".encode()
    assert parse_prompts(data, "p.csv") == ["Why?"]


def test_csv_with_bom_still_finds_the_header():
    assert parse_prompts(BOM + b"prompt,id\nHello,1\n", "p.csv") == ["Hello"]


def test_csv_single_unnamed_column_is_all_prompts():
    assert parse_prompts(b"Hello\nWorld\n", "p.csv") == ["Hello", "World"]


def test_csv_single_named_column_skips_the_header():
    assert parse_prompts(b"prompt\nHello\nWorld\n", "p.csv") == ["Hello", "World"]


def test_csv_quoted_multiline_prompt_and_crlf():
    data = b'prompt,id\r\n"line one\nline two",1\r\n"say ""hi""",2\r\n'
    assert parse_prompts(data, "p.csv") == ["line one\nline two", 'say "hi"']


def test_csv_empty_prompt_cells_are_skipped():
    assert parse_prompts(b"id,prompt\n1,\n2,Kept\n", "p.csv") == ["Kept"]


def test_jsonl_strings_and_objects():
    lines = [
        json.dumps({"prompt": "From prompt", "id": 1}),
        "",
        json.dumps("A bare string"),
        json.dumps({"text": "From text"}),
        json.dumps({"question": "From question", "prompt": 5}),
    ]
    data = ("\n".join(lines) + "\n").encode()
    assert parse_prompts(data, "p.jsonl") == [
        "From prompt",
        "A bare string",
        "From text",
        "From question",
    ]


def test_jsonl_with_bom_and_crlf():
    data = BOM + b'{"prompt": "one"}\r\n{"prompt": "two"}\r\n'
    assert parse_prompts(data, "p.jsonl") == ["one", "two"]


def test_jsonl_keeps_unicode_line_separators_inside_strings():
    # JSON allows U+2028/U+2029 unescaped inside strings; they are not line breaks in JSONL.
    lines = [
        json.dumps({"prompt": "before\u2028after"}, ensure_ascii=False),
        json.dumps({"prompt": "x\x85y\u2029z"}, ensure_ascii=False),
    ]
    data = "\n".join(lines).encode()
    assert parse_prompts(data, "p.jsonl") == ["before\u2028after", "x\x85y\u2029z"]


def test_read_prompts_from_disk(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "on disk"}\n', encoding="utf-8")
    assert read_prompts(path) == ["on disk"]
    assert read_prompts(str(path)) == ["on disk"]


# --- bad files ---------------------------------------------------------------------------


def test_bad_json_line_is_named_with_its_number():
    data = b'{"prompt": "fine"}\n\n{"prompt": broken}\n'
    with pytest.raises(PromptFileError, match=r"p\.jsonl: line 3 is not JSON"):
        parse_prompts(data, "p.jsonl")


def test_jsonl_object_without_a_prompt_field():
    with pytest.raises(PromptFileError, match=r"line 2 has no text field \(prompt or"):
        parse_prompts(b'{"prompt": "ok"}\n{"answer": "no prompt"}\n', "p.jsonl")


@pytest.mark.parametrize("value", ["42", "[1, 2]", "null"])
def test_jsonl_line_of_the_wrong_type(value: str):
    with pytest.raises(PromptFileError, match="line 1 must be a string or an object"):
        parse_prompts(value.encode(), "p.jsonl")


def test_csv_without_a_prompt_column_names_the_columns():
    with pytest.raises(PromptFileError, match=r"no prompt column.*found id, answer"):
        parse_prompts(b"id,answer\n1,2\n", "p.csv")


def test_csv_short_row_is_named_with_its_line():
    with pytest.raises(PromptFileError, match="line 3 has no value in the prompt column"):
        parse_prompts(b"id,prompt\n1,ok\n2\n", "p.csv")


def test_csv_line_numbers_count_blank_and_multiline_rows():
    # Line 1 header, line 2 blank, lines 3-4 one quoted two-line cell, line 5 the bad row.
    data = b'id,prompt\n\n1,"two\nlines"\n2\n'
    with pytest.raises(PromptFileError, match="line 5 has no value"):
        parse_prompts(data, "p.csv")


@pytest.mark.parametrize("name", ["prompts.xlsx", "prompts", "prompts.json"])
def test_unsupported_extension(name: str):
    with pytest.raises(PromptFileError, match=r"unsupported file type .*use \.txt, \.csv, \.jsonl"):
        parse_prompts(b"Hello\n", name)


@pytest.mark.parametrize("name", ["p.txt", "p.csv", "p.jsonl"])
def test_non_utf8_bytes(name: str):
    with pytest.raises(PromptFileError, match=rf"{name}: not UTF-8 text \(line 2, byte 7 "):
        parse_prompts(b"ok\ncaf\xe9\xff\n", name)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("p.txt", b""),
        ("p.txt", b"  \n\n \t\n"),
        ("p.csv", b""),
        ("p.csv", b"prompt\n"),
        ("p.jsonl", b"\n\n"),
        ("p.jsonl", b'{"prompt": "   "}\n'),
    ],
)
def test_no_prompts(name: str, data: bytes):
    with pytest.raises(PromptFileError, match=rf"{name}: contains no prompts"):
        parse_prompts(data, name)


def test_non_utf8_position_counts_the_bom():
    with pytest.raises(PromptFileError, match=r"line 1, byte 6 cannot be decoded"):
        parse_prompts(BOM + b"ab\xff\n", "p.txt")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(PromptFileError, match=r"nope\.txt: no such file"):
        read_prompts(path)


def test_directory(tmp_path):
    folder = tmp_path / "prompts.txt"
    folder.mkdir()
    with pytest.raises(PromptFileError, match="is a directory"):
        read_prompts(folder)


def test_errors_are_value_errors():
    assert issubclass(PromptFileError, ValueError)
