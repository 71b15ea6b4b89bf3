"""`study-query-llm db backup`: a consistent, readable copy of a SQLite file that is being written.

A writer thread records calls through the app's own engine the whole time the backups are
taken. Every copy must pass SQLite's integrity check, be at the newest schema, and hold a
number of calls between the counts before and after it was taken; the writer must never
fail because of a backup.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from study_query_llm.cli import main
from study_query_llm.db import migrate
from study_query_llm.db.backup import BackupError, backup_sqlite, pg_dump_command
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.models_v2 import RawCall


def _calls(url: str) -> int:
    with get_engine(url).connect() as conn:
        return conn.execute(select(func.count()).select_from(RawCall)).scalar_one()


class Writer(threading.Thread):
    """Records one call per transaction until stopped."""

    def __init__(self, url: str, make_call) -> None:
        super().__init__(daemon=True)
        self.url, self.make_call = url, make_call
        self.written = 0
        self.errors: list[BaseException] = []
        self.started_writing = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        engine = get_engine(self.url)
        while not self.stop.is_set():
            try:
                with UnitOfWork(engine, write=True) as uow:
                    uow.calls.add_many([self.make_call(prompt=f"prompt {self.written}")])
                    uow.commit()
                self.written += 1
                self.started_writing.set()
            except BaseException as exc:
                self.errors.append(exc)
                self.started_writing.set()
                return


@pytest.fixture
def sqlite_url(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    migrate.upgrade(url)
    yield url
    dispose_engine(url)


def test_backups_taken_while_calls_are_written_are_consistent(
    sqlite_url: str, tmp_path: Path, make_call
) -> None:
    writer = Writer(sqlite_url, make_call)
    writer.start()
    assert writer.started_writing.wait(timeout=60)
    copies = []
    try:
        for number in range(5):
            before = _calls(sqlite_url)
            result = backup_sqlite(sqlite_url, tmp_path / f"copy-{number}.db")
            after = _calls(sqlite_url)
            copies.append((result, before, after))
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    assert not writer.errors, f"a write failed during a backup: {writer.errors[0]!r}"
    assert _calls(sqlite_url) > copies[0][1], "writes went on around the backups"
    for result, before, after in copies:
        assert before <= result.calls <= after
        assert result.schema == migrate.head()
        with sqlite3.connect(result.path) as copy:
            assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert copy.execute("SELECT count(*) FROM raw_calls").fetchone()[0] == result.calls
            assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        copy_url = f"sqlite:///{result.path}"
        assert migrate.current(copy_url) == migrate.head()
        dispose_engine(copy_url)


def test_cli_backup_writes_a_file_and_refuses_to_overwrite_it(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.chdir(tmp_path)  # no developer .env
    target = tmp_path / "backup.db"
    assert main(["db", "backup", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"backed up to {target} (") and "0 calls" in out
    assert main(["db", "backup", str(target)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["db", "backup", str(target), "--force"]) == 0
    folder = tmp_path / "backups"
    folder.mkdir()
    assert main(["db", "backup", str(folder)]) == 0
    [dated] = folder.iterdir()
    assert dated.name.startswith("live-") and dated.suffix == ".db"


def test_backup_refuses_postgresql_and_names_the_pg_dump_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    url = "postgresql+psycopg://lab:pw-SECRET-42@db.example:5432/study?sslmode=require"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    assert main(["db", "backup", str(tmp_path / "x.dump")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "pg_dump --format=custom" in err
    assert "postgresql://lab@db.example:5432/study?sslmode=require" in err
    assert "pw-SECRET-42" not in err
    assert "pw-SECRET-42" not in pg_dump_command(url)


def test_backup_problems_are_clear(sqlite_url: str, tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="no such database file"):
        backup_sqlite(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path / "b.db")
    assert not (tmp_path / "missing.db").exists(), "a missing source is not created"
    with pytest.raises(BackupError, match="no such directory"):
        backup_sqlite(sqlite_url, tmp_path / "nowhere" / "b.db")
    with pytest.raises(BackupError, match="cannot overwrite the database itself"):
        backup_sqlite(sqlite_url, tmp_path / "live.db", overwrite=True)
    with pytest.raises(BackupError, match="in-memory"):
        backup_sqlite("sqlite://", tmp_path / "b.db")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
