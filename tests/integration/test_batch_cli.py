"""`study-query-llm batch run|status|list|resume` against a real database.

Commands run in-process through `cli.main()` (mock provider, no latency) with the database
from DATABASE_URL, plus one run of the installed console script against the loopback
server. Errors are one line on stderr with exit code 2 (usage) or 1 (failed calls).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from study_query_llm.cli import main
from study_query_llm.config import Settings
from study_query_llm.db.connection import UnitOfWork, get_engine
from study_query_llm.db.models_jobs import BatchJob, BatchJobItem
from study_query_llm.db.models_v2 import Group, RawCall
from study_query_llm.services.context import open_services
from study_query_llm.services.jobs import Target
from study_query_llm.testing.server import LoopbackServer

CLI = str(Path(sys.executable).with_name("study-query-llm"))
PROMPTS = ["What is 2 + 2?", "Name a prime, please", 'Quote "this", then stop']
SUMMARY = re.compile(r"(\d+) succeeded, (\d+) failed, (\d+) cancelled, (\d+) open of (\d+)")


@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """DATABASE_URL set to a fresh database, the mock provider instant, cwd a temp dir."""
    monkeypatch.chdir(tmp_path)  # no .env from the repository
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("MOCK_LATENCY_MS", "0")
    return db_url


@pytest.fixture
def no_db(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """DATABASE_URL set to a SQLite file that must not come into existence."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "untouched.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    monkeypatch.setenv("MOCK_LATENCY_MS", "0")
    return path


def read(engine: Engine, stmt: Any) -> list[Any]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.scalars(stmt))


def summary(out: str) -> tuple[int, ...]:
    match = SUMMARY.search(out)
    assert match, out
    return tuple(int(n) for n in match.groups())


def write_prompts(path: Path, kind: str) -> Path:
    if kind == "txt":
        text = "\n".join(PROMPTS) + "\n\n"
    elif kind == "csv":
        rows = ["id,prompt,notes"] + [
            f'{i},"{p.replace(chr(34), chr(34) * 2)}",n{i}' for i, p in enumerate(PROMPTS)
        ]
        text = "\n".join(rows) + "\n"
    else:
        text = "\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS))
    target = path / f"prompts.{kind}"
    target.write_text(text, encoding="utf-8")
    return target


# --- batch run -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl"])
def test_batch_run_over_a_prompts_file(cli_db: str, tmp_path: Path, capsys, kind: str) -> None:
    prompts = write_prompts(tmp_path, kind)
    code = main(
        ["batch", "run", "--prompts", str(prompts), "--provider", "mock", "--model",
         "mock-small", "--model", "mock-large", "--samples", "2", "--concurrency", "3",
         "--group", f"from {kind}", "--no-progress"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 prompts x 2 models x 2 samples" in captured.err
    assert summary(captured.out) == (12, 0, 0, 0, 12)
    assert "this run: 0 retries" in captured.out
    assert "Traceback" not in captured.out + captured.err

    engine = get_engine(cli_db)
    [job] = read(engine, select(BatchJob))
    assert (job.name, job.status, job.total_items) == (f"from {kind}", "completed", 12)
    assert f"batch {job.id} (from {kind}), group {job.group_id}" in captured.out
    [group] = read(engine, select(Group))
    assert (group.id, group.group_type, group.name) == (job.group_id, "batch", f"from {kind}")
    items = read(
        engine,
        select(BatchJobItem).where(BatchJobItem.job_id == job.id).order_by(BatchJobItem.position),
    )
    assert [(i.prompt, i.model, i.sample_index) for i in items] == [
        (p, m, s) for p in PROMPTS for m in ("mock-small", "mock-large") for s in range(2)
    ]
    assert all(i.status == "succeeded" and i.call_id is not None for i in items)
    calls = read(engine, select(RawCall))
    assert sorted(c.id for c in calls) == sorted(i.call_id for i in items)
    assert {c.provider for c in calls} == {"mock"}


def test_batch_run_with_targets_and_the_default_group_name(cli_db: str, tmp_path: Path, capsys):
    prompts = write_prompts(tmp_path, "txt")
    code = main(
        ["batch", "run", "--prompts", str(prompts), "--target", "mock:mock-large",
         "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert summary(out) == (3, 0, 0, 0, 3)
    [job] = read(get_engine(cli_db), select(BatchJob))
    assert job.name.startswith("batch ")
    assert job.spec_json["targets"] == [["mock", "mock-large"]]


def test_batch_run_with_permanent_failures_exits_1(
    cli_db: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("MOCK_PERMANENT_FAILURE_RATE", "0.5")
    monkeypatch.setenv("MOCK_SEED", "3")
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(f"question {i}" for i in range(20)), encoding="utf-8")
    code = main(["batch", "run", "--prompts", str(prompts), "-m", "mock-small", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    succeeded, failed, cancelled, still_open, total = summary(out)
    assert succeeded > 0 and failed > 0
    assert (succeeded + failed, cancelled, still_open, total) == (20, 0, 0, 20)
    failures = read(get_engine(cli_db), select(RawCall).where(RawCall.status == "failed"))
    assert len(failures) == failed  # permanent: one attempt each, never retried


# --- status, list, resume ------------------------------------------------------------------


def _create_job(db_url: str, prompts: list[str], name: str) -> int:
    async def create() -> int:
        settings = Settings(_env_file=None, database_url=db_url)
        async with open_services(settings) as services:
            return await services.batches.create_job(
                prompts, [Target("mock", "mock-small")], n_samples=2, name=name
            )

    return asyncio.run(create())


def test_status_list_and_resume(cli_db: str, capsys) -> None:
    job_id = _create_job(cli_db, ["one", "two", "three"], "planned only")

    assert main(["batch", "status", str(job_id)]) == 0
    out = capsys.readouterr().out
    assert f"batch {job_id} (planned only): pending" in out
    assert re.search(r"pending\s+6\n", out) and re.search(r"succeeded\s+0\n", out)
    assert re.search(r"total\s+6\n", out)

    assert main(["batch", "list"]) == 0
    assert re.search(
        rf"^\s*{job_id}\s+pending\s+0/6\s+planned only$", capsys.readouterr().out, re.M
    )

    assert main(["batch", "resume", str(job_id), "--no-progress", "-c", "2"]) == 0
    out = capsys.readouterr().out
    assert summary(out) == (6, 0, 0, 0, 6)
    assert "resume with" not in out

    assert main(["batch", "status", str(job_id)]) == 0
    out = capsys.readouterr().out
    assert f"batch {job_id} (planned only): completed" in out
    assert re.search(r"succeeded\s+6\n", out) and re.search(r"pending\s+0\n", out)
    assert main(["batch", "list"]) == 0
    assert re.search(
        rf"^\s*{job_id}\s+completed\s+6/6\s+planned only$", capsys.readouterr().out, re.M
    )

    # Resuming a finished batch makes no call.
    engine = get_engine(cli_db)
    calls = len(read(engine, select(RawCall.id)))
    assert main(["batch", "resume", str(job_id), "--no-progress"]) == 0
    assert summary(capsys.readouterr().out) == (6, 0, 0, 0, 6)
    assert len(read(engine, select(RawCall.id))) == calls == 6


def test_list_with_no_batches_prints_nothing(cli_db: str, capsys) -> None:
    assert main(["batch", "list"]) == 0
    assert capsys.readouterr().out == ""


# --- errors --------------------------------------------------------------------------------


def _one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "no such file"),
        ("prompts.pdf", b"%PDF-1.4", "unsupported file type .pdf"),
        ("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
        ("folder.txt", "dir", "is a directory"),
        ("empty.jsonl", b"\n\n", "contains no prompts"),
        ("bad.jsonl", b'{"prompt": "ok"}\n{not json\n', "line 2"),
        ("cols.csv", b"a,b\n1,2\n", "no prompt column"),
    ],
)
def test_unusable_prompts_file_is_one_line_exit_2(
    no_db: Path, tmp_path: Path, capsys, name: str, content, message: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code = main(["batch", "run", "--prompts", str(path), "-m", "mock-small", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    _one_line_error(captured.err, name, message)
    assert captured.out == ""
    assert not no_db.exists()  # refused before touching the database


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--provider", "openai", "-m", "gpt-4o-mini"], "OPENAI_API_KEY"),
        (["--provider", "nope", "-m", "x"], "unknown provider 'nope'"),
        (["--target", "mock-small"], "provider:model"),
        (["-m", "mock-small", "--samples", "0"], "--samples"),
        (["-m", "mock-small", "--concurrency", "0"], "--concurrency"),
        (["-m", "mock-small", "--lease-seconds", "0"], "--lease-seconds"),
    ],
)
def test_bad_batch_arguments_are_one_line_exit_2(
    no_db: Path, tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    prompts = write_prompts(tmp_path, "txt")
    code = main(["batch", "run", "--prompts", str(prompts), "--no-progress", *argv])
    captured = capsys.readouterr()
    assert code == 2
    _one_line_error(captured.err, message)
    assert not no_db.exists()


@pytest.mark.parametrize("command", ["status", "resume"])
def test_unknown_job_id_exits_2(cli_db: str, capsys, command: str) -> None:
    code = main(["batch", command, "4242"])
    captured = capsys.readouterr()
    assert code == 2
    _one_line_error(captured.err, "no batch job with id 4242")
    assert captured.out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["-c", "0"], "--concurrency"), (["--lease-seconds", "-1"], "--lease-seconds")],
)
def test_bad_resume_arguments_exit_2_and_change_nothing(
    cli_db: str, capsys, argv: list[str], message: str
) -> None:
    job_id = _create_job(cli_db, ["one"], "untouched")
    code = main(["batch", "resume", str(job_id), "--no-progress", *argv])
    assert code == 2
    _one_line_error(capsys.readouterr().err, message)
    [job] = read(get_engine(cli_db), select(BatchJob))
    assert job.status == "pending"
    assert read(get_engine(cli_db), select(RawCall)) == []


# --- the installed console script ----------------------------------------------------------


def test_console_script_runs_a_batch_against_the_loopback_server(
    db_url: str, loopback: LoopbackServer, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path, "jsonl")
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "OPENAI_API_KEY": "k",
        "OPENAI_BASE_URL": loopback.openai_base_url,
    }
    result = subprocess.run(
        [CLI, "batch", "run", "--prompts", str(prompts), "--provider", "openai",
         "--model", "gpt-4o-mini", "--model", "gpt-4o", "--concurrency", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert summary(result.stdout) == (6, 0, 0, 0, 6)
    assert "Traceback" not in result.stderr
    assert "6/6" in result.stderr  # the progress bar reached the end
    assert loopback.count("/v1/chat/completions") == 6
    models = sorted(r.model for r in loopback.requests)
    assert models == ["gpt-4o"] * 3 + ["gpt-4o-mini"] * 3
