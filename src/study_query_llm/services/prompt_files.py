"""Read batch prompts from TXT (one per line), CSV (a `prompt` column) or JSONL files.

Every problem is a `PromptFileError` that names the file and, where it applies, the line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

SUPPORTED = (".txt", ".csv", ".jsonl")
PROMPT_KEYS = ("prompt", "text", "input", "question")


class PromptFileError(ValueError):
    """The prompts file cannot be used; the message says why and where."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file on disk."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: no such file")
    if path.is_dir():
        raise PromptFileError(f"{path}: is a directory, not a prompts file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read it ({exc.strerror})") from None
    return parse_prompts(data, path.name)


def size_text(n_bytes: int) -> str:
    """A byte count as a person reads it (``5 MB``, ``1.5 MB``, ``700 KB``)."""
    if n_bytes >= 1_048_576:
        return f"{n_bytes / 1_048_576:.1f}".removesuffix(".0") + " MB"
    return f"{max(1, round(n_bytes / 1024))} KB"


def parse_prompts(
    data: bytes | str,
    filename: str,
    *,
    max_bytes: int | None = None,
    max_prompts: int | None = None,
) -> list[str]:
    """Prompts from file contents; the extension of `filename` picks the format.

    `max_bytes` and `max_prompts` (the upload limits) refuse larger files with a message
    that names the limit and the setting that raises it.
    """
    suffix = Path(filename).suffix.lower()
    if suffix not in SUPPORTED:
        raise PromptFileError(
            f"{filename}: unsupported file type {suffix or '(none)'}; use {', '.join(SUPPORTED)}"
        )
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))
    if max_bytes is not None and size > max_bytes:
        have, limit = size_text(size), size_text(max_bytes)
        if have == limit:  # just over: rounded sizes would read the same
            have, limit = f"{size:,} bytes", f"{max_bytes:,} bytes"
        raise PromptFileError(
            f"{filename}: {have} is over the upload limit of {limit} (UPLOAD_MAX_BYTES); "
            "split it into smaller files"
        )
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            # utf-8-sig counts from after the BOM; report the position in the file
            offset = exc.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
            line = data.count(b"\n", 0, offset) + 1
            raise PromptFileError(
                f"{filename}: not UTF-8 text (line {line}, byte {offset + 1} cannot be "
                "decoded); save the file as UTF-8"
            ) from None
    else:
        text = data
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".csv":
        prompts = _csv(text, filename)
    else:
        prompts = _jsonl(text, filename)
    if not prompts:
        raise PromptFileError(f"{filename}: contains no prompts")
    if max_prompts is not None and len(prompts) > max_prompts:
        raise PromptFileError(
            f"{filename}: {len(prompts):,} prompts is over the limit of {max_prompts:,} per "
            "batch (UPLOAD_MAX_PROMPTS); split it into smaller files"
        )
    return prompts


def _csv(text: str, filename: str) -> list[str]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []  # (line where the row starts, cells)
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                # Count physical lines, as an editor shows them: the row ends on
                # `line_num` and starts as many lines earlier as its quoted cells span.
                rows.append((reader.line_num - sum(cell.count("\n") for cell in row), row))
    except csv.Error as exc:
        raise PromptFileError(
            f"{filename}: line {reader.line_num} is not valid CSV ({exc})"
        ) from None
    if not rows:
        return []
    header_cells = rows[0][1]
    header = [cell.strip().lower() for cell in header_cells]
    column = next((header.index(k) for k in PROMPT_KEYS if k in header), None)
    if column is None:
        if len(header) == 1:
            body, column = rows, 0  # a single unnamed column: every row is a prompt
        else:
            raise PromptFileError(
                f"{filename}: no prompt column; name one of {', '.join(PROMPT_KEYS)} "
                f"(found {', '.join(header_cells)})"
            )
    else:
        body = rows[1:]
    prompts = []
    for number, row in body:
        if column >= len(row):
            raise PromptFileError(f"{filename}: line {number} has no value in the prompt column")
        if row[column].strip():
            prompts.append(row[column].strip())
    return prompts


def _jsonl(text: str, filename: str) -> list[str]:
    prompts = []
    # Only \n ends a JSONL line: str.splitlines() would also split on U+2028, U+0085 and
    # other characters that JSON allows unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{filename}: line {number} is not JSON ({exc.msg})") from None
        if isinstance(value, str):
            prompt = value
        elif isinstance(value, dict):
            key = next((k for k in PROMPT_KEYS if isinstance(value.get(k), str)), None)
            if key is None:
                raise PromptFileError(
                    f"{filename}: line {number} has no text field ({' or '.join(PROMPT_KEYS)})"
                )
            prompt = value[key]
        else:
            raise PromptFileError(
                f"{filename}: line {number} must be a string or an object with a prompt"
            )
        if prompt.strip():
            prompts.append(prompt.strip())
    return prompts
