"""Inference-path benchmark (issue 4): plain AsyncOpenAI vs. our recorded paths.

N chat calls at concurrency C against the loopback server (run as a separate process,
so it does not compete with the client for the GIL) answering after a fixed latency.
Variants, alternated round by round in the same run (order rotated each round):

- ``plain-sdk``: ``openai.AsyncOpenAI`` + ``asyncio.gather`` bounded by a semaphore, no
  recording (the baseline the issue's target is measured against);
- ``plain-sdk-aiohttp``: the same, with the SDK's own aiohttp transport
  (``http_client=openai.DefaultAioHttpClient()``), which our providers use: the
  like-for-like baseline, so the table shows the recording's own cost apart from the
  transport's saving;
- ``batch-<db>``: ``BatchService.run_batch`` (create the job, then run it at concurrency
  C), recording every call, on a fresh database;
- ``run-<db>``: ``InferenceService.run`` via ``asyncio.gather`` + semaphore, recording
  every call, on a fresh database;

where ``<db>`` is a fresh SQLite file and/or a throwaway PostgreSQL database. The ideal
wall time is N / C x latency. After every recorded run the script checks that
``raw_calls`` holds exactly N success rows (and ``inference_runs`` N rows).

    .venv/bin/python bench/inference_bench.py                     # SQLite and PostgreSQL
    .venv/bin/python bench/inference_bench.py --db sqlite --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from study_query_llm.config import Settings
from study_query_llm.db.connection import dispose_engine
from study_query_llm.services.context import Services, build_services
from study_query_llm.services.jobs import Target

MODEL = "gpt-4o-mini"
PROVIDER = "openai"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


# --------------------------------------------------------------------------------------
# The loopback server, in its own process
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def loopback_server(latency_ms: float) -> Iterator[tuple[str, int]]:
    """Start `python -m study_query_llm.testing.server`; yield (base URL, pid)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "study_query_llm.testing.server",
            "--port",
            "0",
            "--delay-ms",
            str(latency_ms),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"loopback server did not print its URL (got {url!r})")
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of another process (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


# --------------------------------------------------------------------------------------
# Databases
# --------------------------------------------------------------------------------------


@dataclass
class Database:
    """A fresh, empty database for one recorded run, and how to throw it away."""

    url: str
    drop: Callable[[], None]


def fresh_sqlite(workdir: Path) -> Database:
    path = workdir / f"bench-{uuid.uuid4().hex[:8]}.db"
    url = f"sqlite:///{path}"

    def drop() -> None:
        dispose_engine(url)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    return Database(url, drop)


def fresh_postgres(admin_url: str) -> Database:
    name = f"sqllm_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        dispose_engine(url)
        # Other work on the box may restart PostgreSQL: retry on a fresh connection.
        for attempt in range(5):
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except OperationalError as exc:
                admin.dispose()
                if attempt == 4:
                    print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
                time.sleep(1 + attempt)
        admin.dispose()

    return Database(url, drop)


def postgres_reachable(admin_url: str) -> str | None:
    """None when the admin URL answers, else the reason."""
    try:
        engine = create_engine(admin_url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure means "skip PostgreSQL"
        return str(exc).splitlines()[0]
    return None


def recorded_counts(services: Services) -> tuple[int, int, int]:
    """(raw_calls success rows, all raw_calls rows, inference_runs rows)."""
    with services.engine.connect() as conn:
        success = conn.execute(
            text("SELECT count(*) FROM raw_calls WHERE status = 'success'")
        ).scalar_one()
        total = conn.execute(text("SELECT count(*) FROM raw_calls")).scalar_one()
        runs = conn.execute(text("SELECT count(*) FROM inference_runs")).scalar_one()
    return int(success), int(total), int(runs)


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


@dataclass
class Config:
    calls: int
    concurrency: int
    latency_ms: float
    base_url: str  # the loopback server's OpenAI base URL (…/v1)
    workdir: Path
    pg_admin_url: str

    @property
    def prompts(self) -> list[str]:
        return [f"Benchmark prompt {i}: say something about item {i}." for i in range(self.calls)]


@dataclass
class Sample:
    wall_s: float
    cpu_s: float  # this process, all threads (event loop + recorder's worker threads)
    server_cpu_s: float | None
    transactions: int | None = None  # recorder write transactions (recorded variants)


async def bounded_gather(
    n: int, concurrency: int, call: Callable[[int], Awaitable[object]]
) -> list[object]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> object:
        async with semaphore:
            return await call(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def plain_sdk(cfg: Config, *, aiohttp: bool = False) -> None:
    transport = {"http_client": openai.DefaultAioHttpClient()} if aiohttp else {}
    client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key="k", max_retries=0, **transport)
    prompts = cfg.prompts
    try:

        async def call(i: int) -> str | None:
            completion = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[i]}]
            )
            return completion.choices[0].message.content

        replies = await bounded_gather(cfg.calls, cfg.concurrency, call)
    finally:
        await client.close()
    if sum(1 for r in replies if r) != cfg.calls:
        raise RuntimeError("plain SDK: some calls came back empty")


async def ours_batch(cfg: Config, services: Services) -> None:
    succeeded = 0
    async for outcome in services.batches.run_batch(
        cfg.prompts,
        [Target(PROVIDER, MODEL)],
        concurrency=cfg.concurrency,
        name="inference bench",
    ):
        succeeded += outcome.status == "succeeded"
    if succeeded != cfg.calls:
        raise RuntimeError(f"batch: {succeeded} of {cfg.calls} items succeeded")


async def ours_run(cfg: Config, services: Services) -> None:
    prompts = cfg.prompts

    async def call(i: int) -> bool:
        result = await services.inference.run(prompts[i], provider=PROVIDER, model=MODEL)
        return result.ok

    results = await bounded_gather(cfg.calls, cfg.concurrency, call)
    if sum(1 for ok in results if ok) != cfg.calls:
        raise RuntimeError("InferenceService.run: some calls failed")


@dataclass
class Variant:
    name: str
    description: str
    db: str | None = None  # "sqlite" | "postgres" | None (no recording)
    kind: str = "plain"  # "plain" | "plain-aiohttp" | "batch" | "run"
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # failed runs (e.g. database restarted)


def measure(variant: Variant, cfg: Config, server_pid: int, *, calls: int | None = None) -> Sample:
    """One timed run of `variant` (fresh event loop; fresh database when recording)."""
    run_cfg = cfg if calls is None else Config(**{**cfg.__dict__, "calls": calls})
    services: Services | None = None
    database: Database | None = None
    if variant.db is not None:
        database = (
            fresh_sqlite(cfg.workdir)
            if variant.db == "sqlite"
            else fresh_postgres(cfg.pg_admin_url)
        )
        settings = Settings(
            _env_file=None,
            database_url=database.url,
            openai_api_key="k",
            openai_base_url=cfg.base_url,
        )
        services = build_services(settings)  # migrates; not timed

    async def timed() -> tuple[float, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        if services is None:
            await plain_sdk(run_cfg, aiohttp=variant.kind == "plain-aiohttp")
        elif variant.kind == "batch":
            await ours_batch(run_cfg, services)
        else:
            await ours_run(run_cfg, services)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if services is not None:
            await services.aclose()  # closes the SDK client; records are already committed
        return wall, cpu

    gc.collect()
    server_cpu_before = process_cpu_s(server_pid)
    try:
        wall, cpu = asyncio.run(timed())
        server_cpu_after = process_cpu_s(server_pid)
        server_cpu = (
            server_cpu_after - server_cpu_before
            if server_cpu_before is not None and server_cpu_after is not None
            else None
        )
        sample = Sample(wall, cpu, server_cpu)
        if services is not None:
            success, total, runs = recorded_counts(services)
            sample.transactions = services.recorder.transactions
            print(
                f"    verify {variant.name}: raw_calls success={success} (all rows={total}),"
                f" inference_runs={runs}, recorder transactions={services.recorder.transactions}",
                flush=True,
            )
            if not (success == total == runs == run_cfg.calls):
                raise RuntimeError(
                    f"{variant.name}: expected {run_cfg.calls} success rows, got {success}"
                    f" ({total} raw_calls rows, {runs} inference_runs rows)"
                )
    finally:
        if database is not None:
            database.drop()
    return sample


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def machine_facts() -> list[str]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return [
        f"date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"cores (os.cpu_count()): {os.cpu_count()}" + (f" ({cpu_model})" if cpu_model else ""),
        f"python: {platform.python_implementation()} {platform.python_version()}"
        f" on {platform.system()} {platform.release()}",
        f"openai SDK: {openai.__version__}",
        f"load average at start (1/5/15 min): {load_average()}",
    ]


def load_average() -> str:
    """The machine's load average; other work on a shared box skews wall times."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _median_wall(variants: list[Variant], kind: str) -> float | None:
    found = next((v for v in variants if v.kind == kind and v.samples), None)
    return None if found is None else statistics.median(s.wall_s for s in found.samples)


def _versus(wall: float, base: float | None) -> str:
    return "" if base is None else f"{wall / base:.2f}x ({(wall / base - 1) * 100:+.0f}%)"


def table(variants: list[Variant], cfg: Config, ideal_s: float) -> str:
    plain_s = _median_wall(variants, "plain")
    aiohttp_s = _median_wall(variants, "plain-aiohttp")
    lines = [
        "| variant | median wall s | runs (wall s) | calls/s | vs plain SDK"
        " | vs plain SDK on aiohttp | vs ideal | client CPU ms/call | server CPU ms/call"
        " | DB txns |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| ideal (N / C x latency) | {ideal_s:.3f} | computed | {cfg.calls / ideal_s:,.0f}"
        f" | {'' if plain_s is None else f'{ideal_s / plain_s:.2f}x'}"
        f" | {'' if aiohttp_s is None else f'{ideal_s / aiohttp_s:.2f}x'} | 1.00x | | | |",
    ]
    for v in variants:
        if not v.samples:
            lines.append(
                f"| {v.description} | failed | {len(v.errors)} failed runs | | | | | | | |"
            )
            continue
        wall = statistics.median(s.wall_s for s in v.samples)
        runs = ", ".join(f"{s.wall_s:.2f}" for s in v.samples)
        if v.errors:
            runs += f" ({len(v.errors)} failed)"
        cpu = statistics.median(s.cpu_s for s in v.samples) / cfg.calls * 1000
        server = [s.server_cpu_s for s in v.samples if s.server_cpu_s is not None]
        server_ms = f"{statistics.median(server) / cfg.calls * 1000:.2f}" if server else "n/a"
        txns = [s.transactions for s in v.samples if s.transactions is not None]
        lines.append(
            f"| {v.description} | {wall:.3f} | {runs} | {cfg.calls / wall:,.0f}"
            f" | {_versus(wall, plain_s)} | {_versus(wall, aiohttp_s)}"
            f" | {wall / ideal_s:.2f}x | {cpu:.2f} | {server_ms}"
            f" | {statistics.median(txns) if txns else ''} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per run (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="in flight (default 64)")
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="server delay per request (default 50)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument(
        "--db",
        choices=("sqlite", "postgres", "both"),
        default="both",
        help="databases for the recorded variants (default both; PostgreSQL is skipped"
        " with a note when unreachable)",
    )
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL),
        help="PostgreSQL server to create throwaway databases on",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated variant names to run (e.g. plain-sdk,batch-sqlite; for"
        " profiling with py-spy); default all",
    )
    parser.add_argument(
        "--warmup-calls",
        type=int,
        default=200,
        help="untimed calls per variant before the first round (imports, connections)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ideal_s = args.calls / args.concurrency * args.latency_ms / 1000
    facts = machine_facts()
    databases = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    notes: list[str] = []
    if "postgres" in databases:
        reason = postgres_reachable(args.pg_admin_url)
        if reason is not None:
            if args.db == "postgres":
                print(f"PostgreSQL unreachable: {reason}", file=sys.stderr)
                return 2
            databases.remove("postgres")
            notes.append(f"PostgreSQL skipped (unreachable: {reason})")

    variants = [
        Variant("plain-sdk", "plain AsyncOpenAI + gather, no recording"),
        Variant(
            "plain-sdk-aiohttp",
            "plain AsyncOpenAI on its aiohttp transport + gather, no recording",
            kind="plain-aiohttp",
        ),
    ]
    for db in databases:
        label = "SQLite file" if db == "sqlite" else "PostgreSQL"
        variants.append(
            Variant(f"batch-{db}", f"ours: BatchService.run_batch, {label}", db, "batch")
        )
        variants.append(
            Variant(f"run-{db}", f"ours: InferenceService.run + gather, {label}", db, "run")
        )

    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = wanted - {v.name for v in variants}
        if unknown:
            print(f"unknown variant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        variants = [v for v in variants if v.name in wanted]

    print("# Inference benchmark (issue 4)\n")
    for fact in facts:
        print(f"- {fact}")
    print(
        f"- workload: {args.calls} chat calls, concurrency {args.concurrency},"
        f" {args.latency_ms:g} ms server latency, {args.rounds} rounds (order rotated),"
        " loopback server in a separate process"
    )
    for note in notes:
        print(f"- {note}")
    print(flush=True)

    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="sqllm-bench-") as tmp,
        loopback_server(args.latency_ms) as (url, server_pid),
    ):
        cfg = Config(
            calls=args.calls,
            concurrency=args.concurrency,
            latency_ms=args.latency_ms,
            base_url=url + "/v1",
            workdir=Path(tmp),
            pg_admin_url=args.pg_admin_url,
        )
        if args.warmup_calls > 0:
            print(f"warm-up: {args.warmup_calls} calls per variant (untimed)", flush=True)
            for variant in variants:
                measure(variant, cfg, server_pid, calls=args.warmup_calls)
        for round_no in range(args.rounds):
            shift = round_no % len(variants)
            order = variants[shift:] + variants[:shift]
            print(f"round {round_no + 1}/{args.rounds}", flush=True)
            for variant in order:
                try:
                    sample = measure(variant, cfg, server_pid)
                except Exception as exc:  # report it and go on with the other variants
                    variant.errors.append(f"{type(exc).__name__}: {exc}")
                    print(f"  {variant.name:<16} FAILED: {variant.errors[-1][:300]}", flush=True)
                    continue
                variant.samples.append(sample)
                print(
                    f"  {variant.name:<16} {sample.wall_s:7.3f} s"
                    f"  ({args.calls / sample.wall_s:,.0f} calls/s,"
                    f" client CPU {sample.cpu_s:.2f} s)",
                    flush=True,
                )

    print()
    print(table(variants, cfg, ideal_s))
    print(
        "\nmedian of the rounds; vs plain SDK = wall / plain wall (target: within +10%);"
        " vs plain SDK on aiohttp = wall / wall of the plain SDK on the transport our"
        " providers use (the recording's own cost); CPU columns: process CPU (user+sys)"
        " per call, client includes the recorder's writer threads"
    )
    print(f"\nload average at end (1/5/15 min): {load_average()}")
    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    failed = [v for v in variants if v.errors]
    for v in failed:
        print(f"\n{v.name}: {len(v.errors)} failed run(s): {v.errors[0][:300]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
