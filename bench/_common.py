"""What the scale benchmarks share: benchmark databases, machine facts, load, timing, tables.

Benchmark databases live outside the repository: SQLite files under ``/work/bench-data``
(``BENCH_DATA_DIR``) and PostgreSQL databases named ``sqllm_bench_*`` on the server at
``BENCH_PG_ADMIN_URL`` (default: the local test server). ``--db sqlite`` and ``--db
postgres`` stand for the default database of each kind, which the issue's figures name:
1,000,000 calls on SQLite and 5,000,000 on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from study_query_llm.db.connection import dispose_engine, normalize_url
from study_query_llm.db.urls import redact_url

DATA_DIR = Path(os.environ.get("BENCH_DATA_DIR", "/work/bench-data"))
PG_ADMIN_URL = os.environ.get(
    "BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PG_PREFIX = "sqllm_bench_"
DEFAULT_ROWS = {"sqlite": 1_000_000, "postgresql": 5_000_000}


def default_url(kind: str) -> str:
    """The default benchmark database of `kind` ("sqlite" or "postgres")."""
    if kind == "sqlite":
        return f"sqlite:///{DATA_DIR / 'bench-1m.db'}"
    if kind in ("postgres", "postgresql"):
        return make_url(PG_ADMIN_URL).set(database=f"{PG_PREFIX}5m").render_as_string(False)
    raise ValueError(f"unknown database kind {kind!r}")


def resolve_url(value: str) -> str:
    """`value` as a database URL: "sqlite" / "postgres" mean the default databases."""
    if value in ("sqlite", "postgres", "postgresql"):
        return default_url(value)
    return normalize_url(value).render_as_string(hide_password=False)


def add_db_argument(parser: Any) -> None:
    """`--db`, repeatable: a database URL, or 'sqlite' / 'postgres' for the default ones."""
    parser.add_argument(
        "--db",
        action="append",
        help="database URL, or 'sqlite' / 'postgres' (default: both default databases)",
    )


def chosen_urls(values: list[str] | None) -> list[str]:
    """The databases `--db` named, else the default ones that exist (empty: none yet)."""
    if values:
        try:
            return [resolve_url(v) for v in values]
        except ArgumentError as exc:
            raise SystemExit(f"error: --db: {exc}") from None
    return [default_url(k) for k in ("sqlite", "postgres") if database_exists(default_url(k))]


def print_header(script: str, *notes: str) -> None:
    """The markdown heading, machine facts and notes every benchmark starts with."""
    print(f"## {script}")
    for line in (*machine_facts(), *notes):
        print(f"- {line}")
    print()


def backend(url: str) -> str:
    """ "sqlite" or "postgresql"."""
    return normalize_url(url).get_backend_name()


def _admin_engine():
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def _bench_pg_name(url: str) -> str:
    name = normalize_url(url).database or ""
    if not name.startswith(PG_PREFIX):
        raise SystemExit(
            f"error: benchmark PostgreSQL databases must be named {PG_PREFIX}*, got {name!r}"
        )
    return name


def ensure_database(url: str) -> None:
    """Create the benchmark database (a PostgreSQL database, or a SQLite file's folder)."""
    if backend(url) == "sqlite":
        path = Path(normalize_url(url).database or "")
        path.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        return
    name = _bench_pg_name(url)
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()


def drop_database(url: str) -> None:
    """Delete the benchmark database (SQLite file with its WAL, or PostgreSQL database)."""
    dispose_engine(url)
    if backend(url) == "sqlite":
        path = Path(normalize_url(url).database or "")
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = _bench_pg_name(url)
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def database_exists(url: str) -> bool:
    if backend(url) == "sqlite":
        return Path(normalize_url(url).database or "").exists()
    name = _bench_pg_name(url)
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            return bool(
                conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            )
    except Exception:  # server unreachable: treat as missing
        return False
    finally:
        admin.dispose()


def database_size(url: str) -> str:
    """The database's size on disk, human-readable."""
    if backend(url) == "sqlite":
        path = Path(normalize_url(url).database or "")
        size = sum(
            Path(f"{path}{s}").stat().st_size for s in ("", "-wal") if Path(f"{path}{s}").exists()
        )
    else:
        engine = create_engine(normalize_url(url))
        try:
            with engine.connect() as conn:
                size = int(conn.scalar(text("SELECT pg_database_size(current_database())")))
        finally:
            engine.dispose()
    return f"{size / 2**30:.2f} GiB"


# --- machine and load ---------------------------------------------------------------------


def load_average() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews every timing)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _meminfo_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "n/a"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "n/a"


def postgres_version() -> str:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            version = conn.scalar(text("SHOW server_version"))
        engine.dispose()
        return str(version)
    except Exception as exc:  # unreachable: say so
        return f"unreachable ({str(exc).splitlines()[0][:60]})"


def machine_facts() -> list[str]:
    """Lines describing the machine and software a figure was measured on."""
    return [
        f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"cpu: {os.cpu_count()} cores ({_cpu_model()}), RAM {_meminfo_gib()}",
        f"python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"SQLite {sqlite3.sqlite_version}, PostgreSQL {postgres_version()}",
        f"load average (1/5/15 min): {load_average()}",
    ]


def print_facts(title: str) -> None:
    print(f"## {title}")
    for line in machine_facts():
        print(f"- {line}")
    print()


# --- timing and tables -------------------------------------------------------------------


def time_runs(fn: Callable[[], Any], runs: int, *, warmup: int = 1) -> tuple[list[float], Any]:
    """Wall seconds of `runs` calls of `fn` (after `warmup` untimed calls) and its last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1000


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def show_url(url: str) -> str:
    return redact_url(url)
