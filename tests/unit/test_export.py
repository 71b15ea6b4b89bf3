"""CSV and Parquet export of frames: what is written reads back as the same table."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pandas as pd
import pyarrow.parquet as pq
import pytest

from study_query_llm.export import csv_bytes, parquet_bytes

BOM = "\ufeff".encode()
TRICKY = [
    "plain",
    "a, comma",
    'say "hi"',
    "two\nlines",
    "crlf\r\nline",
    "ünïcödé — 日本語 🙂",
    "<img src=x onerror=alert(1)>",
    "=SUM(A1:A2)",
    "",
    "  spaces kept  ",
]


def _read_csv(data: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), encoding="utf-8-sig", keep_default_na=False)


def test_csv_starts_with_a_bom_and_is_utf8() -> None:
    data = csv_bytes(pd.DataFrame({"text": ["é"]}))
    assert data.startswith(BOM)
    assert data[len(BOM) :].decode("utf-8") == "text\né\n"


def test_csv_round_trip_keeps_every_character_literal() -> None:
    frame = pd.DataFrame({"id": range(len(TRICKY)), "text": TRICKY})
    data = csv_bytes(frame)
    back = _read_csv(data)
    assert list(back.columns) == ["id", "text"]
    assert list(back["id"]) == list(range(len(TRICKY)))
    assert list(back["text"]) == TRICKY
    # HTML stays text: nothing is escaped on the way out.
    assert b"<img src=x onerror=alert(1)>" in data and b"&lt;" not in data
    # The standard library's csv module (what other tools use) reads the same cells.
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    assert rows[0] == ["id", "text"] and [r[1] for r in rows[1:]] == TRICKY


def test_csv_writes_structured_cells_as_json_and_missing_as_empty() -> None:
    frame = pd.DataFrame(
        {
            "meta": [{"a": 1, "b": "ü"}, None, ["x", 2]],
            "n": [1.5, None, 3.0],
            "when": pd.to_datetime(
                ["2024-03-02T22:50:07.25Z", None, "2024-01-01T00:00Z"], format="ISO8601"
            ),
        }
    )
    back = pd.read_csv(io.BytesIO(csv_bytes(frame)), encoding="utf-8-sig")
    assert json.loads(back.loc[0, "meta"]) == {"a": 1, "b": "ü"}
    assert pd.isna(back.loc[1, "meta"]) and json.loads(back.loc[2, "meta"]) == ["x", 2]
    assert back.loc[0, "n"] == 1.5 and pd.isna(back.loc[1, "n"])
    when = pd.to_datetime(back["when"], utc=True, format="ISO8601")
    assert when[0] == pd.Timestamp("2024-03-02T22:50:07.25Z") and pd.isna(when[1])


def test_csv_of_an_empty_frame_has_its_header() -> None:
    data = csv_bytes(pd.DataFrame(columns=["id", "prompt"]))
    assert data == BOM + b"id,prompt\n"


def _round_trip(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(parquet_bytes(frame)), engine="pyarrow")


def _values(series: pd.Series) -> list:
    """The column's values with every kind of missing value as None."""
    return [None if pd.isna(v) else v for v in series]


def test_parquet_round_trip_keeps_types_and_text() -> None:
    paris = timezone(timedelta(hours=2))
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "cost": [0.5, None, 1e-9],
            "ok": [True, False, True],
            "tokens": pd.array([10, None, 30], dtype="Int64"),
            "text": ["<b>bold</b>", 'a,b\n"c"', "ünïcode 🙂"],
            "created_at": pd.to_datetime(
                ["2024-03-02T22:50:07.250Z", "2024-03-03T00:00Z", "2024-03-04T12:00Z"],
                utc=True,
                format="ISO8601",
            ),
            "local": pd.to_datetime(["2024-03-02 10:00", "2024-07-01 10:00", None]).tz_localize(
                "Europe/Paris"
            ),
            "objects_of_one_tz": [datetime(2024, 1, 1, 12, tzinfo=paris), None, None],
        }
    )
    back = _round_trip(frame)
    assert list(back.columns) == list(frame.columns)
    assert list(back["id"]) == [1, 2, 3] and back["id"].dtype.kind == "i"
    assert back["cost"][0] == 0.5 and pd.isna(back["cost"][1]) and back["cost"][2] == 1e-9
    assert list(back["ok"]) == [True, False, True]
    assert back["tokens"][0] == 10 and pd.isna(back["tokens"][1])
    assert list(back["text"]) == list(frame["text"])
    assert str(back["created_at"].dt.tz) == "UTC"
    assert (back["created_at"] == frame["created_at"]).all()
    assert str(back["local"].dt.tz) == "Europe/Paris"
    assert back["local"][0] == frame["local"][0] and pd.isna(back["local"][2])
    assert back["objects_of_one_tz"][0] == pd.Timestamp("2024-01-01T10:00Z")
    assert back["objects_of_one_tz"][0].tzinfo is not None


def test_parquet_writes_mixed_and_structured_columns_as_text() -> None:
    frame = pd.DataFrame(
        {
            "mixed": [1, "a", 2.5, None],
            "bool_and_int": [True, 1, None, False],
            "meta": [{"a": 1, "nested": {"b": [1, 2]}}, None, {"other": "é"}, {}],
            "items": [[1, 2], ["x"], None, []],
            "dict_or_text": [{"k": "v"}, "just text", None, 7],
            "decimal": [Decimal("1.5"), Decimal("2"), None, Decimal("0.25")],
        }
    )
    back = _round_trip(frame)
    assert _values(back["mixed"]) == ["1", "a", "2.5", None]
    assert _values(back["bool_and_int"]) == ["True", "1", None, "False"]
    assert json.loads(back["meta"][0]) == {"a": 1, "nested": {"b": [1, 2]}}
    assert pd.isna(back["meta"][1]) and json.loads(back["meta"][2]) == {"other": "é"}
    assert json.loads(back["meta"][3]) == {}
    assert [None if v is None else json.loads(v) for v in _values(back["items"])] == [
        [1, 2],
        ["x"],
        None,
        [],
    ]
    assert _values(back["dict_or_text"]) == ['{"k": "v"}', "just text", None, "7"]
    assert _values(back["decimal"]) == list(frame["decimal"])
    # The text columns are typed as text in the file, for any Parquet reader.
    schema = pq.read_schema(io.BytesIO(parquet_bytes(frame)))
    for name in ("mixed", "bool_and_int", "meta", "items", "dict_or_text"):
        assert str(schema.field(name).type) in ("string", "large_string"), name


def test_parquet_accepts_awkward_column_names() -> None:
    frame = pd.DataFrame([[1, 2, 3]], columns=["a", "a", 5])
    back = _round_trip(frame)
    assert list(back.columns) == ["a", "a (2)", "5"]
    assert list(back.iloc[0]) == [1, 2, 3]
    assert _round_trip(pd.DataFrame(columns=["id", "prompt"])).empty


def test_mixed_offsets_become_one_instant_each() -> None:
    stamps = [
        datetime(2024, 1, 1, 12, tzinfo=UTC),
        datetime(2024, 1, 1, 14, tzinfo=timezone(timedelta(hours=2))),
    ]
    back = _round_trip(pd.DataFrame({"when": pd.Series(stamps, dtype=object)}))
    assert list(back["when"]) == [pd.Timestamp("2024-01-01T12:00Z")] * 2


def test_the_export_module_does_not_import_panel() -> None:
    code = "import sys, study_query_llm.export; print('panel' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("encode", [csv_bytes, parquet_bytes])
def test_the_frame_given_is_not_changed(encode) -> None:
    frame = pd.DataFrame({"meta": [{"a": 1}], "x": [1]})
    encode(frame)
    assert frame.loc[0, "meta"] == {"a": 1} and list(frame.columns) == ["meta", "x"]
