"""v1 -> v2 import and its check, on real databases: SQLite -> SQLite and SQLite -> PostgreSQL.

The legacy source is a SQLite file built by the shipped v1 migration and the v1
repository (or by hand-written SQL for older table shapes); the target is the `db_url`
database. The scripts run as child processes for the end-to-end cases. Corruption of the
target (which the append-only triggers normally prevent) is made by going around them,
as a bad restore or a hand edit would.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from study_query_llm.cli import main as cli_main
from study_query_llm.db import migrate
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.legacy import LegacyDatabase, LegacySourceError
from study_query_llm.db.models_legacy import LegacyBatch, LegacyCall
from study_query_llm.db.models_v2 import Group, GroupMember, RawCall
from study_query_llm.db.records import NewCall, NewRun
from study_query_llm.legacy_commands import import_main, validate_main
from study_query_llm.services.legacy_import import (
    ImportProgress,
    LegacyImporter,
    LegacyImportError,
    original_metadata,
)
from study_query_llm.services.legacy_validate import BackfillValidator

ROOT = Path(__file__).resolve().parents[2]
IMPORT_SCRIPT = ROOT / "scripts" / "migrate_v1_to_v2.py"
VALIDATE_SCRIPT = ROOT / "scripts" / "validate_backfill.py"
T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

ODD_TEXTS = [
    "plain ascii",
    "emoji 😀👩‍🔬 and flags 🇺🇦",
    "مرحبا بالعالم (right to left)",
    "e\u0301 combining, ß, ﬁ ligature, 東京",
    "quotes ' \" ` and SQL '); DROP TABLE raw_calls; --",
    "<script>alert('x')</script> &amp; 100% a_b \\n backslash \\",
    "line one\r\nline two\ttabbed\u2028separator",
    "",
    "long " + "x" * 20_000,
]


def legacy_runs() -> list[NewRun]:
    """Rows with odd text and metadata; batch rows made out of id order on purpose."""
    runs = []
    for i, prompt in enumerate(ODD_TEXTS):
        runs.append(
            NewRun(
                prompt=prompt,
                response=f"answer to {prompt[:30]}" if i != 2 else None,
                provider="openai" if i % 2 else "anthropic",
                model=None if i == 3 else f"model-{i}",
                tokens=None if i == 4 else 10 * i,
                latency_ms=None if i == 5 else 12.5 * i + 0.25,
                metadata_json=[
                    {"temperature": 0.7, "tags": ["a", "ü"], "nested": {"k": [1, 2.5]}},
                    None,
                    ["a", "list"],
                    {"legacy": "a key the import also uses"},
                    {},
                    {"ключ": "значение", "n": 12345678901234},
                ][i % 6],
                created_at=T0 + timedelta(minutes=i),
            )
        )
    # Batch "b-ü": rows inserted newest first, so id order is the reverse of time order.
    for j in range(4):
        runs.append(
            NewRun(
                prompt=f"batch ü prompt {j}",
                response=f"r{j}",
                provider="openai",
                model="gpt",
                tokens=j,
                batch_id="b-ü",
                created_at=T0 + timedelta(hours=1, minutes=10 - j),
            )
        )
    # Batches whose ids sort differently by code point and by a natural-language collation.
    for j, batch in enumerate(["a-batch", "B-batch", "_batch", "a-batch", "B-batch"]):
        runs.append(
            NewRun(
                prompt=f"{batch} prompt {j}",
                response="ok",
                provider="mock",
                model="m",
                batch_id=batch,
                created_at=T0 + timedelta(hours=2, minutes=j),
            )
        )
    # Two rows of one batch made at the very same moment: id breaks the tie.
    for j in range(2):
        runs.append(
            NewRun(
                prompt=f"tie {j}",
                response="same time",
                provider="mock",
                model="m",
                batch_id="tie",
                created_at=T0 + timedelta(hours=3),
            )
        )
    return runs


def make_legacy(path: Path, runs: list[NewRun]) -> str:
    """A v1 database (the shipped v1 migration) at `path` holding `runs`; its URL."""
    url = f"sqlite:///{path}"
    migrate.upgrade(url, "0001_v1_schema")
    add_legacy(url, runs)
    return url


def add_legacy(url: str, runs: list[NewRun]) -> None:
    with UnitOfWork(get_engine(url)) as uow:
        uow.runs.add_many(runs)
        uow.commit()
    dispose_engine(url)


@pytest.fixture
def legacy_url(tmp_path: Path) -> str:
    return make_legacy(tmp_path / "legacy.db", legacy_runs())


def run_import(source: str, target: str, **options: Any) -> Any:
    with LegacyDatabase(source) as legacy:
        return LegacyImporter(legacy, get_engine(target), **options).run()


def validate(source: str, target: str, **options: Any) -> Any:
    with LegacyDatabase(source) as legacy:
        return BackfillValidator(legacy, get_engine(target), **options).run()


def count(engine: Engine, model: Any) -> int:
    with UnitOfWork(engine) as uow:
        return int(uow.session.scalar(select(func.count()).select_from(model)) or 0)


def legacy_rows(url: str) -> list[dict[str, Any]]:
    """The legacy rows as the v1 model reads them, in id order."""
    with UnitOfWork(get_engine(url)) as uow:
        rows = [run.to_dict() for run in uow.runs.query(limit=1000).rows]
    dispose_engine(url)
    return sorted(rows, key=lambda row: row["id"])


def imported_calls(engine: Engine) -> dict[int, RawCall]:
    """The imported calls by legacy row id."""
    with UnitOfWork(engine) as uow:
        pairs = uow.session.execute(
            select(LegacyCall.legacy_id, RawCall).join(RawCall, RawCall.id == LegacyCall.call_id)
        ).all()
    return dict(pairs)


def batch_groups(engine: Engine) -> dict[str, tuple[str, list[int]]]:
    """legacy batch_id -> (group name, legacy row ids of its members in position order)."""
    out: dict[str, tuple[str, list[int]]] = {}
    with UnitOfWork(engine) as uow:
        for batch_id, group_id in uow.session.execute(
            select(LegacyBatch.batch_id, LegacyBatch.group_id)
        ):
            group = uow.session.get(Group, group_id)
            legacy_ids = uow.session.scalars(
                select(LegacyCall.legacy_id)
                .join(GroupMember, GroupMember.call_id == LegacyCall.call_id)
                .where(GroupMember.group_id == group_id)
                .order_by(GroupMember.position)
            ).all()
            out[batch_id] = (group.name, list(legacy_ids))
    return out


def expected_batches(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    batches: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["batch_id"] is not None:
            batches.setdefault(row["batch_id"], []).append(row)
    return {
        batch: [r["id"] for r in sorted(members, key=lambda r: (r["created_at"], r["id"]))]
        for batch, members in batches.items()
    }


# --- the import copies everything -------------------------------------------------------------


def test_every_field_batch_and_order_is_copied(legacy_url: str, db_url: str) -> None:
    report = run_import(legacy_url, db_url, chunk_size=4)
    source = legacy_rows(legacy_url)
    engine = get_engine(db_url)

    assert (report.source_rows, report.imported, report.skipped) == (len(source), len(source), 0)
    calls = imported_calls(engine)
    assert sorted(calls) == [row["id"] for row in source]
    for row in source:
        call = calls[row["id"]]
        assert call.request_json == {"prompt": row["prompt"]}
        assert call.response_json == {"text": row["response"]}
        assert (call.status, call.modality) == ("success", "chat")
        assert call.provider == row["provider"]
        assert call.model == (row["model"] or "unknown")
        assert call.total_tokens == row["tokens"]
        assert call.latency_ms == row["latency_ms"]
        assert call.created_at == row["created_at"]
        assert original_metadata(call.metadata_json) == row["metadata_json"]
        assert call.metadata_json["legacy"]["id"] == row["id"]
    # Metadata objects keep their keys at the top level, next to the provenance.
    first = calls[source[0]["id"]].metadata_json
    assert first["temperature"] == 0.7 and first["legacy"]["batch_id"] is None

    want = expected_batches(source)
    got = batch_groups(engine)
    assert {b: ids for b, (_, ids) in got.items()} == want
    assert got["b-ü"][0] == "v1 batch b-ü"
    assert want["b-ü"] == sorted(want["b-ü"], reverse=True)  # time order, not id order
    with UnitOfWork(engine) as uow:
        group = uow.groups.find("batch", "v1 batch b-ü")
        assert group.created_at == min(r["created_at"] for r in source if r["batch_id"] == "b-ü")
        positions = [m.position for m in uow.groups.members(group.id)]
    assert positions == [0, 1, 2, 3]
    assert (report.batches, report.groups_created, report.members_added) == (
        len(want),
        len(want),
        sum(map(len, want.values())),
    )
    # The imported text is searchable like any other call.
    with UnitOfWork(engine) as uow:
        assert [h.call_id for h in uow.calls.search("DROP TABLE")] == [calls[source[4]["id"]].id]

    checked = validate(legacy_url, db_url, full=True)
    assert checked.ok, checked.render()


def test_running_twice_creates_nothing_new(legacy_url: str, db_url: str) -> None:
    first = run_import(legacy_url, db_url, chunk_size=5)
    engine = get_engine(db_url)
    counts = [count(engine, m) for m in (RawCall, LegacyCall, Group, GroupMember)]

    second = run_import(legacy_url, db_url, chunk_size=3)

    assert [count(engine, m) for m in (RawCall, LegacyCall, Group, GroupMember)] == counts
    assert (second.imported, second.skipped) == (0, first.source_rows)
    assert (second.groups_created, second.members_added) == (0, 0)
    assert second.members_present == first.members_added


def test_rows_added_to_the_source_later_are_imported_in_order(legacy_url: str, db_url: str) -> None:
    run_import(legacy_url, db_url)
    before = batch_groups(get_engine(db_url))["b-ü"][1]
    add_legacy(
        legacy_url,
        [
            NewRun(
                prompt="late",
                response="late answer",
                provider="openai",
                batch_id="b-ü",
                created_at=T0 + timedelta(days=1),
            ),
            NewRun(prompt="new batch", provider="mock", batch_id="new", created_at=T0),
        ],
    )

    report = run_import(legacy_url, db_url)

    assert (report.imported, report.groups_created, report.members_added) == (2, 1, 2)
    groups = batch_groups(get_engine(db_url))
    latest = legacy_rows(legacy_url)[-2]["id"]
    assert groups["b-ü"][1] == [*before, latest]
    assert validate(legacy_url, db_url, full=True).ok


def test_an_interrupted_run_resumes_without_duplicates(legacy_url: str, db_url: str) -> None:
    seen: list[ImportProgress] = []

    def stop_after_two_chunks(progress: ImportProgress) -> None:
        seen.append(progress)
        if progress.phase == "calls" and progress.done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_import(legacy_url, db_url, chunk_size=3, progress=stop_after_two_chunks)
    engine = get_engine(db_url)
    assert count(engine, RawCall) == count(engine, LegacyCall) == 6  # two whole chunks
    assert count(engine, GroupMember) == 0
    assert not validate(legacy_url, db_url).ok

    report = run_import(legacy_url, db_url, chunk_size=4)

    total = len(legacy_rows(legacy_url))
    assert (report.imported, report.skipped) == (total - 6, 6)
    assert count(engine, RawCall) == count(engine, LegacyCall) == total
    assert validate(legacy_url, db_url, full=True).ok


def _fail_on_legacy_id(db_url: str, legacy_id: int) -> None:
    """A target-side trigger that makes the chunk holding `legacy_id` fail mid-write."""
    with get_engine(db_url).begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER fail_import BEFORE INSERT ON legacy_calls "
                f"WHEN NEW.legacy_id = {legacy_id} BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION fail_import() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'disk on fire'; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER fail_import BEFORE INSERT ON legacy_calls FOR EACH ROW "
                f"WHEN (NEW.legacy_id = {legacy_id}) EXECUTE FUNCTION fail_import()"
            )


def _script(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LEGACY_DATABASE_URL")}
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_scripts_end_to_end_with_a_failure_mid_chunk(legacy_url: str, db_url: str) -> None:
    """A chunk that fails half-way leaves nothing of itself; the rerun completes it."""
    _fail_on_legacy_id(db_url, 8)
    urls = ["--source", legacy_url, "--target", db_url]

    failed = _script(IMPORT_SCRIPT, *urls, "--chunk-size", "3", "--no-progress")

    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0, failed.stderr
    assert failed.stderr.startswith("error: database problem:") and "disk on fire" in failed.stderr
    engine = get_engine(db_url)
    # Rows 1-6 (two chunks) committed; the chunk of rows 7-9 left no raw_calls behind.
    assert count(engine, RawCall) == count(engine, LegacyCall) == 6

    check = _script(VALIDATE_SCRIPT, *urls)
    assert check.returncode == 1
    assert "MISMATCH  rows" in check.stdout and "v1 row 7 has no v2 call" in check.stdout

    with engine.begin() as conn:
        on = "" if engine.name == "sqlite" else " ON legacy_calls"
        conn.exec_driver_sql(f"DROP TRIGGER fail_import{on}")
    done = _script(IMPORT_SCRIPT, *urls, "--chunk-size", "3")

    assert done.returncode == 0, done.stderr
    total = len(legacy_rows(legacy_url))
    assert f"{total - 6:,} imported now, 6 already imported" in done.stdout
    assert "v1 rows" in done.stderr  # the progress bar
    assert count(engine, RawCall) == count(engine, LegacyCall) == total

    check = _script(VALIDATE_SCRIPT, *urls, "--full")
    assert check.returncode == 0, check.stdout
    assert "result: v1 and v2 agree" in check.stdout
    for name in ("rows", "batches", "order", "timestamps", "sample"):
        assert f"ok        {name}" in check.stdout


def test_nul_characters_are_stored_as_replacement_characters(tmp_path: Path, db_url: str) -> None:
    url = make_legacy(
        tmp_path / "nul.db",
        [
            NewRun(
                prompt="before\x00after",
                response="r\x00",
                provider="mock",
                metadata_json={"k\x00": "v\x00"},
                batch_id="nul\x00batch",
            )
        ],
    )
    report = run_import(url, db_url)

    assert report.sanitised == 1
    call = next(iter(imported_calls(get_engine(db_url)).values()))
    assert call.request_json == {"prompt": "before\ufffdafter"}
    assert call.response_json == {"text": "r\ufffd"}
    assert call.metadata_json["k\ufffd"] == "v\ufffd"
    assert call.metadata_json["legacy"]["sanitised"] is True
    assert batch_groups(get_engine(db_url)) == {"nul\ufffdbatch": ("v1 batch nul\ufffdbatch", [1])}
    assert validate(url, db_url, full=True).ok


# --- the check catches a corrupted target -------------------------------------------------------


def _tamper(db_url: str, *statements: str) -> None:
    """Run SQL on the target around its append-only triggers and foreign keys."""
    engine = get_engine(db_url)
    if engine.name == "sqlite":
        conn = sqlite3.connect(engine.url.database)
        try:
            conn.execute("DROP TRIGGER IF EXISTS raw_calls_no_update")
            conn.execute("DROP TRIGGER IF EXISTS raw_calls_no_delete")
            for statement in statements:
                conn.execute(statement)
            conn.commit()
        finally:
            conn.close()
        return
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for statement in statements:
            conn.exec_driver_sql(statement)


def _call_of(db_url: str, legacy_id: int) -> int:
    with UnitOfWork(get_engine(db_url)) as uow:
        return uow.session.scalar(
            select(LegacyCall.call_id).where(LegacyCall.legacy_id == legacy_id)
        )


def _group_of(db_url: str, batch_id: str) -> int:
    with UnitOfWork(get_engine(db_url)) as uow:
        return uow.session.scalar(
            select(LegacyBatch.group_id).where(LegacyBatch.batch_id == batch_id)
        )


def _delete_group(db_url: str, batch_id: str) -> None:
    """Delete a batch group the way the app does (its memberships go with it)."""
    with UnitOfWork(get_engine(db_url)) as uow:
        uow.groups.delete(_group_of(db_url, batch_id))
        uow.commit()


CORRUPTIONS = {
    "v2 row missing": (
        lambda url: _tamper(url, f"DELETE FROM raw_calls WHERE id = {_call_of(url, 3)}"),
        {"rows", "sample"},
        "v1 row 3: its v2 call",
    ),
    "import record lost": (
        lambda url: _tamper(url, "DELETE FROM legacy_calls WHERE legacy_id = 2"),
        {"rows", "sample"},
        "v1 row 2 has no v2 call",
    ),
    "record points at another row": (
        lambda url: _tamper(url, "UPDATE legacy_calls SET legacy_id = 999 WHERE legacy_id = 2"),
        {"rows", "sample"},
        "v2 record of v1 row 999, which the source does not have",
    ),
    "member moved": (
        lambda url: _tamper(
            url,
            f"UPDATE group_members SET position = 99 WHERE group_id = {_group_of(url, 'b-ü')} "
            "AND position = 0",
        ),
        {"order"},
        "batch 'b-ü': position 0 holds v1 row",
    ),
    "member removed": (
        lambda url: _tamper(
            url,
            f"DELETE FROM group_members WHERE group_id = {_group_of(url, 'tie')} AND position = 1",
        ),
        {"batches"},
        "batch 'tie': 2 v1 rows, 1 v2 members",
    ),
    "response text changed": (
        lambda url: _tamper(
            url,
            'UPDATE raw_calls SET response_json = \'{"text": "a different answer"}\' '
            f"WHERE id = {_call_of(url, 5)}",
        ),
        {"sample"},
        "v1 row 5: response_json differs",
    ),
    "metadata changed": (
        lambda url: _tamper(
            url,
            'UPDATE raw_calls SET metadata_json = \'{"legacy": {"id": 1, "source": "x"}}\' '
            f"WHERE id = {_call_of(url, 1)}",
        ),
        {"sample"},
        "v1 row 1: metadata differs",
    ),
    "timestamp shifted": (
        lambda url: _tamper(
            url,
            "UPDATE raw_calls SET created_at = '2020-01-01 00:00:00' "
            f"WHERE id = {_call_of(url, 1)}",
        ),
        {"timestamps", "sample"},
        "v1 row 1: created_at differs",
    ),
    "batch group deleted": (
        lambda url: _delete_group(url, "a-batch"),
        {"batches"},
        "batch 'a-batch': no v2 group",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_the_check_catches_a_corrupted_target(
    legacy_url: str, db_url: str, corruption: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_import(legacy_url, db_url)
    assert validate(legacy_url, db_url, full=True).ok
    corrupt, failing, detail = CORRUPTIONS[corruption]
    corrupt(db_url)

    report = validate(legacy_url, db_url, full=True)

    assert set(report.failed) == failing, report.render()
    assert detail in report.render()
    code = validate_main(["--source", legacy_url, "--target", db_url, "--full"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{len(failing)} check(s) failed" in out
    for name in failing:
        assert f"MISMATCH  {name}" in out


def test_a_corrupted_target_fails_the_script(legacy_url: str, db_url: str) -> None:
    run_import(legacy_url, db_url)
    _tamper(
        db_url,
        'UPDATE raw_calls SET response_json = \'{"text": "forged"}\' '
        f"WHERE id = {_call_of(db_url, 9)}",
    )
    result = _script(VALIDATE_SCRIPT, "--source", legacy_url, "--target", db_url, "--full")
    assert result.returncode == 1
    assert "v1 row 9: response_json differs" in result.stdout
    assert "'forged'" in result.stdout
    assert "result: 1 check(s) failed: sample" in result.stdout


def test_the_sample_is_seeded(legacy_url: str, db_url: str) -> None:
    run_import(legacy_url, db_url)
    _tamper(db_url, 'UPDATE raw_calls SET response_json = \'{"text": "x"}\'')
    one = validate(legacy_url, db_url, sample=5, seed=7).render()
    assert "a sample of 5 rows (seed 7): 5 row(s) differ" in one
    assert validate(legacy_url, db_url, sample=5, seed=7).render() == one
    assert validate(legacy_url, db_url, sample=5, seed=8).render() != one


# --- sources of other shapes and databases -------------------------------------------------------


def test_an_older_table_shape_with_text_timestamps(tmp_path: Path, db_url: str) -> None:
    """Hand-made v1 table: ISO 'T' timestamps with offsets, text metadata, fewer columns."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE inference_runs (id INTEGER PRIMARY KEY, prompt TEXT, response TEXT, "
        "provider TEXT, created_at TEXT, metadata TEXT, batch_id TEXT)"
    )
    conn.executemany(
        "INSERT INTO inference_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (1, "p1", "r1", "openai", "2023-05-01T10:00:00+02:00", '{"a": 1}', "x"),
            (2, "p2", "r2", "openai", "2023-05-01 07:00:00", "not json", "x"),
            (5, "p5", None, "openai", "2023-05-01 07:30:00.5", None, None),
        ],
    )
    conn.commit()
    conn.close()
    url = f"sqlite:///{path}"

    run_import(url, db_url)

    calls = imported_calls(get_engine(db_url))
    assert calls[1].created_at == datetime(2023, 5, 1, 8, 0, tzinfo=UTC)
    assert calls[2].created_at == datetime(2023, 5, 1, 7, 0, tzinfo=UTC)
    assert calls[5].created_at == datetime(2023, 5, 1, 7, 30, 0, 500000, tzinfo=UTC)
    assert original_metadata(calls[2].metadata_json) == "not json"
    assert calls[5].model == "unknown" and calls[5].total_tokens is None
    assert batch_groups(get_engine(db_url))["x"][1] == [2, 1]  # 07:00 before 08:00 UTC
    assert validate(url, db_url, full=True).ok


@pytest.fixture
def pg_legacy_url(pg_server: Any) -> Iterator[str]:
    """An empty PostgreSQL database for a legacy table built by hand."""
    name = pg_server.create_database()
    yield pg_server.url_for(name)
    pg_server.drop_database(name)


@pytest.mark.postgres
def test_postgres_source_with_a_natural_language_collation(
    pg_legacy_url: str, tmp_path: Path
) -> None:
    """Batch ids collated by ICU ("a" < "B") still line up with the target's order."""
    engine = get_engine(pg_legacy_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE inference_runs (id bigserial PRIMARY KEY, prompt text NOT NULL, "
            "response text, provider varchar(100) NOT NULL, model varchar(200), tokens int, "
            "latency_ms double precision, metadata jsonb, "
            'batch_id varchar(64) COLLATE "en-US-x-icu", created_at timestamp NOT NULL)'
        )
        rows = [
            {"p": f"{b} {i}", "b": b, "at": datetime(2024, 1, 1, 0, i)}
            for i, b in enumerate(["a", "B", "_", "a", "B", "é", "Z", None])
        ]
        conn.execute(
            text(
                "INSERT INTO inference_runs (prompt, response, provider, metadata, batch_id, "
                "created_at) VALUES (:p, 'ok', 'mock', '{\"x\": [1, 2]}', :b, :at)"
            ),
            rows,
        )
    dispose_engine(pg_legacy_url)
    target = f"sqlite:///{tmp_path / 'v2.db'}"
    migrate.upgrade(target)

    report = run_import(pg_legacy_url, target, chunk_size=3)

    assert (report.imported, report.batches) == (8, 5)
    groups = batch_groups(get_engine(target))
    assert groups["a"][1] == [1, 4] and groups["B"][1] == [2, 5]
    calls = imported_calls(get_engine(target))
    assert calls[1].created_at == datetime(2024, 1, 1, 0, 0, tzinfo=UTC)  # naive: UTC
    assert original_metadata(calls[1].metadata_json) == {"x": [1, 2]}
    checked = validate(pg_legacy_url, target, full=True)
    assert checked.ok, checked.render()
    dispose_engine(target)


# --- errors are one line, and nothing is touched -------------------------------------------------


def _errors(
    argv: list[str], capsys: pytest.CaptureFixture[str], main: Any = import_main
) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err.strip()


def test_unusable_sources_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LEGACY_DATABASE_URL", raising=False)
    target = tmp_path / "target.db"
    t = ["--target", f"sqlite:///{target}", "--no-progress"]
    (tmp_path / "junk.db").write_text("this is not a database" * 100)
    no_table = sqlite3.connect(tmp_path / "other.db")
    no_table.execute("CREATE TABLE notes (id INTEGER)")
    no_table.execute("CREATE TABLE inference_runz (id INTEGER)")
    no_table.close()
    bad_columns = sqlite3.connect(tmp_path / "shape.db")
    bad_columns.execute("CREATE TABLE inference_runs (id INTEGER PRIMARY KEY, prompt TEXT)")
    bad_columns.close()

    cases = {
        "missing.db": f"error: legacy database not found: {tmp_path / 'missing.db'}",
        "junk.db": "error: legacy database sqlite:///junk.db is not a SQLite database",
        "other.db": "error: legacy database sqlite:///other.db has no inference_runs table "
        "(tables: inference_runz, notes)",
        "shape.db": "error: inference_runs in legacy database sqlite:///shape.db lacks "
        "column(s): response, provider, created_at",
        ".": "error: legacy database",
    }
    for name, message in cases.items():
        code, err = _errors(["--source", f"sqlite:///{name}", *t], capsys)
        assert code == 2
        assert err.startswith(message), err
    assert _errors(t, capsys) == (
        2,
        "error: no legacy database given: pass --source URL or set LEGACY_DATABASE_URL",
    )
    code, err = _errors(["--source", "mysql://u:secret@h/db", *t], capsys)
    assert code == 2 and "secret" not in err and "use sqlite:/// or postgresql://" in err
    assert not (tmp_path / "missing.db").exists()
    assert not target.exists()  # nothing was migrated for a source that cannot be read

    code, err = _errors(
        ["--source", f"sqlite:///{tmp_path / 'missing.db'}", "--target", f"sqlite:///{target}"],
        capsys,
        validate_main,
    )
    assert (code, err) == (2, f"error: legacy database not found: {tmp_path / 'missing.db'}")
    code, err = _errors(["--source", "sqlite:///junk.db", "--chunk-size", "0"], capsys)
    assert code == 2


def test_the_target_cannot_be_the_source(
    legacy_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = legacy_url.removeprefix("sqlite:///")
    same = f"sqlite:///{Path(path).parent}/./{Path(path).name}"
    code, err = _errors(["--source", legacy_url, "--target", same], capsys)
    assert code == 2
    assert err.startswith("error: the legacy database is the target database")
    with LegacyDatabase(legacy_url) as legacy, pytest.raises(LegacyImportError):
        LegacyImporter(legacy, get_engine(legacy_url)).run()
    assert migrate.current(legacy_url) == "0001_v1_schema"  # untouched
    dispose_engine(legacy_url)


def test_check_needs_an_import_and_an_existing_target(
    legacy_url: str, tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = validate_main(["--source", legacy_url, "--target", db_url])
    out = capsys.readouterr().out
    assert code == 1 and "MISMATCH  import" in out and "run the import first" in out

    missing = tmp_path / "nowhere.db"
    code, err = _errors(
        ["--source", legacy_url, "--target", f"sqlite:///{missing}"], capsys, validate_main
    )
    assert code == 2 and err == f"error: target database not found: sqlite:///{missing}"
    assert not missing.exists()


def test_source_name_keeps_a_moved_file_from_importing_twice(
    legacy_url: str, tmp_path: Path, db_url: str
) -> None:
    run_import(legacy_url, db_url, source_name="lab server 2023")
    moved = tmp_path / "moved" / "legacy.db"
    moved.parent.mkdir()
    with (
        sqlite3.connect(legacy_url.removeprefix("sqlite:///")) as old,
        sqlite3.connect(moved) as new,
    ):
        old.backup(new)
    Path(legacy_url.removeprefix("sqlite:///")).unlink()

    again = run_import(f"sqlite:///{moved}", db_url, source_name="lab server 2023")

    assert again.imported == 0 and again.skipped == again.source_rows
    assert validate(f"sqlite:///{moved}", db_url, source_name="lab server 2023", full=True).ok


def test_db_import_v1_command(
    legacy_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    target = f"sqlite:///{tmp_path / 'app.db'}"
    monkeypatch.setenv("DATABASE_URL", target)
    monkeypatch.setenv("LEGACY_DATABASE_URL", legacy_url)

    assert cli_main(["db", "import-v1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    total = len(legacy_rows(legacy_url))
    assert f"{total} in inference_runs: {total} imported now, 0 already imported" in out
    assert migrate.current(target) == migrate.head()
    assert validate_main([]) == 0
    assert cli_main(["db", "import-v1", "--source", "sqlite:///nope.db"]) == 2
    assert "error: legacy database not found" in capsys.readouterr().err
    dispose_engine(target)


def test_reader_rejects_an_in_memory_source() -> None:
    with pytest.raises(LegacySourceError, match="must be a SQLite file"):
        LegacyDatabase("sqlite://")


def test_unmapped_calls_are_not_confused_with_imported_ones(legacy_url: str, db_url: str) -> None:
    """Calls recorded by the app itself are never counted as imported rows."""
    with UnitOfWork(get_engine(db_url)) as uow:
        uow.calls.add(NewCall(provider="mock", model="m", request_json={"prompt": "live"}))
        uow.commit()
    run_import(legacy_url, db_url)
    engine = get_engine(db_url)
    assert count(engine, RawCall) == count(engine, LegacyCall) + 1
    assert validate(legacy_url, db_url, full=True).ok
