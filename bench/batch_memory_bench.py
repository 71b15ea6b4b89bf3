"""Batch memory benchmark (issue 4): resident memory stays flat while a 100,000-item batch runs.

One job of N items (default 100,000) on a fresh SQLite file, run by `BatchService.run_job`
against the mock provider with no latency, recording every call as usual; the consumer
reads outcomes and drops them, as the CLI and dashboard do. The process's resident memory
is sampled at checkpoints (default 10k, 50k and 100k items done): the current RSS, and the
peak RSS since the run started (Linux: `VmHWM`, reset once the job has been written, so
building the plan does not count). If results were held, both would grow with the items.
At the end the script checks that `raw_calls` holds exactly N success rows.

    .venv/bin/python bench/batch_memory_bench.py
    .venv/bin/python bench/batch_memory_bench.py --items 20000 --checkpoints 5000,10000,20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from study_query_llm.config import Settings
from study_query_llm.db import migrate
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.models_v2 import RawCall
from study_query_llm.providers import create
from study_query_llm.services.inference import InferenceService
from study_query_llm.services.jobs import BatchService, Target
from study_query_llm.services.recorder import CallRecorder

TARGET = Target("mock", "mock-small")
MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in KiB, or None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    if kib is None:  # no /proc: the peak is the best figure there is
        return peak_mib()
    return kib / 1024


def peak_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux 4.0+); False if it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Sample:
    done: int
    rss_mib: float
    peak_mib: float
    elapsed_s: float


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


async def run(items: int, checkpoints: list[int], concurrency: int, workdir: Path) -> None:
    url = f"sqlite:///{workdir / 'batch-memory.db'}"
    migrate.upgrade(url)
    engine = get_engine(url)
    settings = Settings(_env_file=None)
    inference = InferenceService(
        CallRecorder(engine), providers=lambda _id: create("mock", settings, latency_ms=0)
    )
    batches = BatchService(engine, inference)
    try:
        print(f"writing the plan: {items:,} items ...", file=sys.stderr)
        before_plan = rss_mib()
        job_id = await batches.create_job(
            (f"memory bench prompt {i}" for i in range(items)), [TARGET], name="memory bench"
        )
        gc.collect()
        after_plan = rss_mib()
        peak_reset = reset_peak()
        samples = [Sample(0, rss_mib(), peak_mib(), 0.0)]
        pending = sorted(c for c in checkpoints if 0 < c <= items)
        started = time.perf_counter()
        done = 0
        async for outcome in batches.run_job(job_id, concurrency=concurrency):
            if outcome.status != "succeeded":
                raise RuntimeError(f"item {outcome.item.position} ended {outcome.status}")
            done += 1
            del outcome
            if pending and done == pending[0]:
                pending.pop(0)
                samples.append(Sample(done, rss_mib(), peak_mib(), time.perf_counter() - started))
                print(f"  {done:>9,} items done", file=sys.stderr)
        with UnitOfWork(engine) as uow:
            recorded = uow.session.scalar(
                select(func.count()).select_from(RawCall).where(RawCall.status == "success")
            )
    finally:
        await inference.aclose()
        dispose_engine(url)

    if recorded != items:
        raise RuntimeError(f"raw_calls holds {recorded} success rows, expected {items}")
    print()
    print(
        f"- workload: {items:,} items (mock provider, latency 0), concurrency {concurrency},"
        " SQLite file"
    )
    print(f"- RSS before writing the plan: {before_plan:.1f} MiB; after: {after_plan:.1f} MiB")
    print(
        "- peak RSS: since the run started"
        + ("" if peak_reset else " (could not reset: peak since the process started)")
    )
    print(f"- raw_calls success rows at the end: {recorded:,} (expected {items:,})")
    print()
    print("| items done | RSS (MiB) | peak RSS (MiB) | elapsed (s) | items/s |")
    print("|---:|---:|---:|---:|---:|")
    for sample in samples:
        rate = f"{sample.done / sample.elapsed_s:,.0f}" if sample.elapsed_s else "-"
        print(
            f"| {sample.done:,} | {sample.rss_mib:.1f} | {sample.peak_mib:.1f} "
            f"| {sample.elapsed_s:.1f} | {rate} |"
        )
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    print()
    print(
        f"peak RSS growth from {first.done:,} to {last.done:,} items: "
        f"{last.peak_mib - first.peak_mib:+.1f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--checkpoints", default="10000,50000,100000")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        checkpoints = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    except ValueError:
        parser.error("--checkpoints must be comma-separated item counts")
    if args.items < 1 or args.concurrency < 1:
        parser.error("--items and --concurrency must be at least 1")
    print(f"date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"cores (os.cpu_count()): {os.cpu_count()}")
    print(
        f"python: {platform.python_implementation()} {platform.python_version()}"
        f" on {platform.system()} {platform.release()}"
    )
    print(f"load average at start (1/5/15 min): {load_average()}")
    with tempfile.TemporaryDirectory(prefix="sqllm-membench-") as workdir:
        asyncio.run(run(args.items, checkpoints, args.concurrency, Path(workdir)))
    print(f"load average at end (1/5/15 min): {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
