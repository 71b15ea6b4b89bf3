"""v1 -> v2 import benchmark: rows per second and peak memory of `scripts/migrate_v1_to_v2.py`.

Generates a legacy SQLite database with N `inference_runs` rows (varied prompt and
response lengths, some non-ASCII text, JSON metadata, a share of rows in batches), then
runs the import and the check (`scripts/validate_backfill.py`) as child processes into a
fresh target and reports wall time, rows/s and each child's peak RSS (from `wait4`). Run
with two sizes to see that memory does not grow with the number of rows.

    .venv/bin/python bench/migrate_bench.py                                  # 1,000,000 rows
    .venv/bin/python bench/migrate_bench.py --rows 100000,1000000 --db both
    .venv/bin/python bench/migrate_bench.py --rows 20000 --keep /tmp/bench   # keep the files

PostgreSQL targets are throwaway databases on BENCH_PG_ADMIN_URL (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

from study_query_llm.db import migrate
from study_query_llm.db.connection import dispose_engine

ROOT = Path(__file__).resolve().parent.parent
IMPORT = ROOT / "scripts" / "migrate_v1_to_v2.py"
VALIDATE = ROOT / "scripts" / "validate_backfill.py"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
WORDS = (
    "model answer latency token prompt study compare photosynthesis gravity entropy "
    "Übersicht naïve café 東京 данные λόγος 😀 résumé"
).split()
PROVIDERS = [("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5"), ("ollama", None)]


def _rows(n: int, seed: int, batch_share: float, batch_size: int) -> Iterator[tuple]:
    rng = random.Random(seed)
    start = dt.datetime(2023, 1, 1)
    batch: str | None = None
    left = 0
    for i in range(1, n + 1):
        if left == 0:
            batch = (
                f"batch-{uuid.UUID(int=rng.getrandbits(128))}"
                if rng.random() < batch_share
                else None
            )
            left = max(1, int(rng.expovariate(1 / batch_size))) if batch else rng.randint(1, 50)
        left -= 1
        provider, model = PROVIDERS[i % len(PROVIDERS)]
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
        response = " ".join(rng.choices(WORDS, k=rng.randint(10, 200)))
        at = start + dt.timedelta(seconds=i * 3 + rng.random())
        meta = json.dumps({"temperature": round(rng.random(), 2), "user": f"u{i % 17}"})
        yield (
            i,
            prompt,
            response,
            provider,
            model,
            rng.randint(20, 900),
            round(rng.uniform(80, 4000), 3),
            meta,
            batch,
            at.strftime("%Y-%m-%d %H:%M:%S.%f"),
        )


def make_legacy(path: Path, n: int, seed: int, batch_share: float, batch_size: int) -> float:
    """Write a v1 database of `n` rows at `path`; return the seconds it took."""
    started = time.perf_counter()
    url = f"sqlite:///{path}"
    migrate.upgrade(url, "0001_v1_schema")  # exactly the v1 table and indexes
    dispose_engine(url)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.executemany(
        "INSERT INTO inference_runs (id, prompt, response, provider, model, tokens, latency_ms,"
        " metadata, batch_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        _rows(n, seed, batch_share, batch_size),
    )
    conn.commit()
    conn.close()
    return time.perf_counter() - started


@dataclass
class ChildRun:
    seconds: float
    peak_rss_mb: float
    code: int
    output: str


def run_child(args: list[str]) -> ChildRun:
    """Run a child process; its wall time and peak resident memory (from wait4)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    return ChildRun(seconds, usage.ru_maxrss / 1024, proc.returncode, output)


@contextlib.contextmanager
def target_url(kind: str, workdir: Path, admin_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'v2-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"sqllm_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        dispose_engine(url)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000", help="comma-separated row counts")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--batch-share", type=float, default=0.3, help="share of batched runs")
    parser.add_argument("--batch-size", type=int, default=40, help="mean rows per batch")
    parser.add_argument("--sample", type=int, default=1000, help="rows the check compares")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep the files")
    parser.add_argument(
        "--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL)
    )
    args = parser.parse_args()
    sizes = [int(x.replace("_", "")) for x in args.rows.split(",")]
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]

    print(f"# v1 -> v2 import benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}"
    )
    print(f"load average at start: {os.getloadavg()}")
    print(f"chunk size {args.chunk_size}, sample {args.sample}, batch share {args.batch_share}")
    baseline = run_child([sys.executable, "-c", "import study_query_llm.legacy_commands"])
    print(
        f"baseline: a child that only imports the commands peaks at {baseline.peak_rss_mb:.0f} MB"
    )
    print()
    results = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = args.keep
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sqllm-bench-")))
        for n in sizes:
            legacy = workdir / f"legacy-{n}.db"
            if not legacy.exists():
                made = make_legacy(legacy, n, args.seed, args.batch_share, args.batch_size)
                size_mb = legacy.stat().st_size / 2**20
                print(f"generated {n:,} legacy rows in {made:.1f} s ({size_mb:,.0f} MB)")
            for kind in kinds:
                with target_url(kind, workdir, args.pg_admin_url) as url:
                    common = ["--source", f"sqlite:///{legacy}", "--target", url]
                    first = run_child(
                        [
                            sys.executable,
                            str(IMPORT),
                            *common,
                            "--no-progress",
                            "--chunk-size",
                            str(args.chunk_size),
                        ]
                    )
                    if first.code != 0:
                        print(first.output)
                        return 1
                    again = run_child([sys.executable, str(IMPORT), *common, "--no-progress"])
                    check = run_child(
                        [sys.executable, str(VALIDATE), *common, "--sample", str(args.sample)]
                    )
                    if check.code != 0:
                        print(check.output)
                        return 1
                    results.append((n, kind, first, again, check))
                    print(
                        f"{n:,} rows -> {kind}: import {first.seconds:.1f} s, "
                        f"rerun {again.seconds:.1f} s, check {check.seconds:.1f} s"
                    )
    print()
    print(f"load average at end: {os.getloadavg()}")
    print()
    print(
        "| rows | target | import s | rows/s | import peak RSS | rerun (all present) s | "
        "check s | check peak RSS |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, kind, first, again, check in results:
        print(
            f"| {n:,} | {kind} | {first.seconds:.1f} | {n / first.seconds:,.0f} | "
            f"{first.peak_rss_mb:.0f} MB | {again.seconds:.1f} | {check.seconds:.1f} | "
            f"{check.peak_rss_mb:.0f} MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
