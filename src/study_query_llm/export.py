"""Tables as files: a pandas frame as CSV or Parquet bytes, for downloads and scripts.

Cell values are written as they are, never escaped or rewritten: a prompt that looks
like HTML or a formula stays exactly that text. Structured cells (dicts, lists, tuples,
such as request or metadata JSON) are written as JSON text in both formats, so a reader
gets `{"a": 1}` rather than Python's repr. Parquet keeps column types where a column has
one (numbers, booleans, timestamps with their time zone); a column mixing types becomes
text. The index is not written.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd

STRUCTURED = (dict, list, tuple)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _is_missing(value: Any) -> bool:
    if isinstance(value, STRUCTURED):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes: not a missing scalar
        return False


def _unique_names(columns: pd.Index) -> list[str]:
    """Column names as text, made unique ("a", "a (2)") so every format accepts them."""
    seen: set[str] = set()
    names = []
    for column in columns:
        name = base = str(column)
        n = 1
        while name in seen:
            n += 1
            name = f"{base} ({n})"
        seen.add(name)
        names.append(name)
    return names


def _structured_as_json(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of the frame whose dict/list/tuple cells are JSON text."""
    frame = frame.copy()
    frame.columns = _unique_names(frame.columns)
    for name in frame.columns:
        values = frame[name]
        if values.dtype == object and any(isinstance(v, STRUCTURED) for v in values):
            frame[name] = values.map(lambda v: _json(v) if isinstance(v, STRUCTURED) else v)
    return frame


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The frame as UTF-8 CSV with a byte-order mark (so spreadsheet programs read accents
    right). Cells with commas, quotes or line breaks are quoted as RFC 4180 says."""
    text = _structured_as_json(frame).to_csv(index=False, lineterminator="\n")
    return text.encode("utf-8-sig")


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """The frame as Parquet (pyarrow). Typed columns keep their type; a column of mixed
    Python objects becomes text (structured cells as JSON), missing values stay null."""
    import pyarrow as pa

    frame = _structured_as_json(frame)
    for name in frame.columns:
        values = frame[name]
        if values.dtype != object:
            continue
        try:
            kind = pa.array(values, from_pandas=True).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            kind = None
        if kind is None or pa.types.is_nested(kind):
            frame[name] = pd.Series(
                [None if _is_missing(v) else v if isinstance(v, str) else str(v) for v in values],
                index=frame.index,
                dtype=object,
            )
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, engine="pyarrow")
    return buffer.getvalue()
