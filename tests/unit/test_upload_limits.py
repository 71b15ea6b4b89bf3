"""Upload limits for prompt files: size and prompt count, refused with the setting to change."""

from __future__ import annotations

import pytest

from study_query_llm.config import Settings
from study_query_llm.services.prompt_files import PromptFileError, parse_prompts, size_text


def test_a_file_over_the_size_limit_is_refused_before_parsing() -> None:
    data = b"x" * 2048 + b"\xff"  # not even UTF-8: the size is checked first
    with pytest.raises(PromptFileError) as refused:
        parse_prompts(data, "big.txt", max_bytes=2048)
    assert str(refused.value) == (
        "big.txt: 2,049 bytes is over the upload limit of 2,048 bytes (UPLOAD_MAX_BYTES); "
        "split it into smaller files"
    )
    with pytest.raises(PromptFileError, match=r"big\.txt: 5 KB is over the upload limit of 2 KB"):
        parse_prompts(b"x" * 5000, "big.txt", max_bytes=2048)


def test_a_file_at_the_limits_is_accepted() -> None:
    data = b"".join(b"prompt %02d\n" % i for i in range(10))
    assert len(parse_prompts(data, "ok.txt", max_bytes=len(data), max_prompts=10)) == 10


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("many.txt", "".join(f"p{i}\n" for i in range(11))),
        ("many.csv", "prompt\n" + "".join(f"p{i}\n" for i in range(11))),
        ("many.jsonl", "".join(f'"p{i}"\n' for i in range(11))),
    ],
)
def test_too_many_prompts_are_refused_in_every_format(name: str, data: str) -> None:
    with pytest.raises(PromptFileError, match=rf"^{name}: 11 prompts is over the limit of 10"):
        parse_prompts(data.encode(), name, max_prompts=10)


def test_text_given_as_str_is_measured_in_utf8_bytes() -> None:
    with pytest.raises(PromptFileError, match="over the upload limit"):
        parse_prompts("é" * 600, "accents.txt", max_bytes=1000)


def test_sizes_read_like_a_person_writes_them() -> None:
    assert [size_text(n) for n in (100, 4096, 7_800, 5 * 1_048_576, 1_572_864)] == [
        "1 KB",
        "4 KB",
        "8 KB",
        "5 MB",
        "1.5 MB",
    ]


def test_default_limits_and_settings() -> None:
    settings = Settings(_env_file=None, upload_max_bytes=1024, upload_max_prompts=7)
    assert (settings.upload_max_bytes, settings.upload_max_prompts) == (1024, 7)
    defaults = Settings(_env_file=None)
    assert (defaults.upload_max_bytes, defaults.upload_max_prompts) == (5 * 1_048_576, 50_000)
