"""Resumable batches: prompts × models × samples, persisted as a job before any call is made.

`BatchService.create_job()` writes the job, its batch group and every planned item in one
transaction. `run_job()` drains it with a bounded pool of workers: each claims items with a
lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL), calls through `InferenceService` (so every
attempt is recorded), and marks the item done in the same transaction that records its
final call. Results stream out as they finish; memory stays bounded whatever the size.
If the process dies, `run_job()` again (from any process, or several at once on
PostgreSQL) finishes the rest once the dead worker's leases run out; finished items are
never called again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from ..db.column_types import utcnow
from ..db.connection import UnitOfWork, run_write
from ..db.repositories.jobs import ClaimedItem, JobCounts, JobRepository, PlannedItem
from ..providers import ProviderError
from .inference import InferenceService, RetryPolicy, RunResult
from .preprocessing import PreprocessConfig


@dataclass(frozen=True)
class Target:
    """A provider and model to send every prompt to."""

    provider: str
    model: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """`provider:model` (the model may itself contain colons, e.g. ``ollama:llama3:8b``)."""
        provider, sep, model = text.partition(":")
        if not sep or not provider or not model:
            raise ValueError(f"target {text!r} must look like provider:model")
        return cls(provider.strip(), model.strip())


def plan_items(
    prompts: Iterable[str], targets: Sequence[Target], n_samples: int = 1
) -> Iterator[PlannedItem]:
    """Items in prompt-major order: prompt 0 × every target × every sample, then prompt 1..."""
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    if not targets:
        raise ValueError("a batch needs at least one provider:model target")
    position = 0
    for prompt in prompts:
        for target in targets:
            for sample in range(n_samples):
                yield PlannedItem(position, prompt, target.provider, target.model, sample)
                position += 1


@dataclass
class BatchProgress:
    """Live counts for a progress bar. `done` counts items finished in any state."""

    total: int
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    retrying: int = 0  # transient failures that will be retried (so far)
    in_flight: int = 0
    already_done: int = 0  # finished before this run started (resumed jobs)
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.already_done + self.succeeded + self.failed + self.cancelled

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.done / self.total

    @property
    def eta_s(self) -> float | None:
        finished_now = self.done - self.already_done
        if finished_now == 0:
            return None
        rate = finished_now / max(time.monotonic() - self.started, 1e-9)
        return (self.total - self.done) / rate


@dataclass
class ItemOutcome:
    """One finished item: its plan, the run result, and whether another worker beat it."""

    item: ClaimedItem
    result: RunResult | None
    error: BaseException | None = None
    superseded: bool = False

    @property
    def status(self) -> str:
        if self.result is not None:
            return "succeeded" if self.result.ok else self.result.status
        return "failed"


ProgressCallback = Callable[[BatchProgress], None]


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class BatchService:
    """Creates, runs, resumes, inspects and cancels batch jobs."""

    def __init__(self, engine: Engine, inference: InferenceService) -> None:
        self.engine = engine
        self.inference = inference
        self._cancelled: set[int] = set()

    # --- database helpers (off the event loop) -------------------------------------------

    async def _write(self, fn: Callable[[UnitOfWork], Any]) -> Any:
        return await asyncio.to_thread(run_write, self.engine, fn)

    async def _read(self, fn: Callable[[UnitOfWork], Any]) -> Any:
        def work() -> Any:
            with UnitOfWork(self.engine) as uow:
                return fn(uow)

        return await asyncio.to_thread(work)

    # --- create --------------------------------------------------------------------------

    async def create_job(
        self,
        prompts: Iterable[str],
        targets: Sequence[Target],
        *,
        n_samples: int = 1,
        options: dict[str, Any] | None = None,
        name: str | None = None,
        preprocess: PreprocessConfig | None = None,
        dedup: bool = False,
    ) -> int:
        """Persist the job, its group and all planned items; no call is made yet."""
        prompts = [p for p in prompts]
        if not prompts:
            raise ValueError("the batch has no prompts")
        blank = [i for i, p in enumerate(prompts) if not str(p).strip()]
        if blank:
            raise ValueError(f"prompt {blank[0] + 1} is empty")
        for target in targets:
            self.inference.provider(target.provider)  # unknown or unconfigured: fail now
        from ..providers.base import CompletionOptions

        CompletionOptions.parse("batch", dict(options or {}))
        name = name or f"batch {utcnow():%Y-%m-%d %H:%M:%S}"
        total = len(prompts) * len(targets) * n_samples
        spec = {
            "targets": [[t.provider, t.model] for t in targets],
            "n_samples": n_samples,
            "options": dict(options or {}),
            "preprocess": (preprocess or self.inference.preprocess_config).model_dump(),
            "dedup": bool(dedup and n_samples == 1),
            "prompts": len(prompts),
        }

        def create(uow: UnitOfWork) -> int:
            group = uow.groups.get_or_create(
                "batch", name, description=f"{total} planned calls", metadata={"spec": spec}
            )
            jobs = JobRepository(uow.session)
            job_id = jobs.create(name, spec, group_id=group.id, total_items=total)
            jobs.add_items(job_id, plan_items(prompts, targets, n_samples))
            return job_id

        return await self._write(create)

    # --- inspect -------------------------------------------------------------------------

    async def counts(self, job_id: int) -> JobCounts:
        return await self._read(lambda uow: JobRepository(uow.session).counts(job_id))

    async def job(self, job_id: int) -> dict[str, Any]:
        def read(uow: UnitOfWork) -> dict[str, Any]:
            repo = JobRepository(uow.session)
            job = repo.get(job_id)
            return {**job.to_dict(), "counts": repo.counts(job_id)}

        return await self._read(read)

    async def list_jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Recent jobs, newest first, with their counts."""

        def read(uow: UnitOfWork) -> list[dict[str, Any]]:
            repo = JobRepository(uow.session)
            return [
                {**job.to_dict(), "counts": repo.counts(job.id)} for job in repo.list_jobs(limit)
            ]

        return await self._read(read)

    async def cancel(self, job_id: int) -> int:
        """Stop a job: running workers stop claiming, pending items become cancelled."""
        self._cancelled.add(job_id)

        def cancel(uow: UnitOfWork) -> int:
            repo = JobRepository(uow.session)
            repo.set_status(job_id, "cancelled")
            return repo.cancel_open(job_id)

        return await self._write(cancel)

    async def reopen(self, job_id: int) -> int:
        """Make cancelled items pending again so `run_job` can finish a cancelled job."""
        from sqlalchemy import update

        from ..db.models_jobs import BatchJobItem

        self._cancelled.discard(job_id)

        def reopen(uow: UnitOfWork) -> int:
            result = uow.session.execute(
                update(BatchJobItem)
                .where(BatchJobItem.job_id == job_id, BatchJobItem.status == "cancelled")
                .where(BatchJobItem.call_id.is_(None))
                .values(status="pending")
            )
            JobRepository(uow.session).set_status(job_id, "running")
            return result.rowcount or 0

        return await self._write(reopen)

    # --- run -----------------------------------------------------------------------------

    async def run_batch(
        self,
        prompts: Iterable[str],
        targets: Sequence[Target],
        *,
        n_samples: int = 1,
        options: dict[str, Any] | None = None,
        name: str | None = None,
        concurrency: int = 8,
        per_provider: dict[str, int] | None = None,
        on_progress: ProgressCallback | None = None,
        dedup: bool = False,
    ) -> AsyncIterator[ItemOutcome]:
        """Create a job and run it; yields outcomes as items finish."""
        job_id = await self.create_job(
            prompts, targets, n_samples=n_samples, options=options, name=name, dedup=dedup
        )
        async for outcome in self.run_job(
            job_id, concurrency=concurrency, per_provider=per_provider, on_progress=on_progress
        ):
            yield outcome

    async def run_job(
        self,
        job_id: int,
        *,
        concurrency: int = 8,
        per_provider: dict[str, int] | None = None,
        on_progress: ProgressCallback | None = None,
        worker: str | None = None,
        lease_s: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> AsyncIterator[ItemOutcome]:
        """Drain the job's open items; yields each outcome as it finishes.

        Stops when every item is finished. Items another live worker holds are waited
        for (until their lease runs out, when this worker may take them over).
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        worker = worker or default_worker_id()
        self._cancelled.discard(job_id)
        job = await self.job(job_id)
        spec = job["spec_json"]
        counts: JobCounts = job["counts"]
        if job["status"] == "cancelled" and counts.open == 0:
            return
        options = dict(spec.get("options") or {})
        preprocess = PreprocessConfig(**spec["preprocess"]) if spec.get("preprocess") else None
        dedup = bool(spec.get("dedup"))
        group_id = job["group_id"]
        await self._write(lambda uow: JobRepository(uow.session).set_status(job_id, "running"))

        progress = BatchProgress(total=counts.total, already_done=counts.finished)
        queue: asyncio.Queue[ItemOutcome | None] = asyncio.Queue(maxsize=concurrency * 2)
        local: deque[ClaimedItem] = deque()
        held: set[int] = set()
        claim_lock = asyncio.Lock()
        provider_limits = {
            name: asyncio.Semaphore(limit) for name, limit in (per_provider or {}).items()
        }
        exhausted = asyncio.Event()

        async def next_item() -> ClaimedItem | None:
            async with claim_lock:
                while not local:
                    if job_id in self._cancelled or exhausted.is_set():
                        return None
                    claimed = await self._write(
                        lambda uow: JobRepository(uow.session).claim(
                            job_id, worker, limit=concurrency, lease_s=lease_s
                        )
                    )
                    if claimed:
                        held.update(item.id for item in claimed)
                        local.extend(claimed)
                        break
                    # Nothing to take now. Items other workers hold may come back when
                    # their leases run out (a dead worker); wait for that, else we are done.
                    waiting = await self._read(
                        lambda uow: JobRepository(uow.session).next_lease_expiry(
                            job_id, exclude_worker=worker
                        )
                    )
                    if waiting is None:
                        exhausted.set()
                        return None
                    await asyncio.sleep(_seconds_until(waiting) + 0.05)
                return local.popleft()

        def finisher(item: ClaimedItem, won: list[bool]) -> Callable[[UnitOfWork, int, str], None]:
            def finish(uow: UnitOfWork, call_id: int, status: str) -> None:
                item_status = {"success": "succeeded", "cancelled": "cancelled"}.get(
                    status, "failed"
                )
                won[0] = JobRepository(uow.session).finish(
                    item.id, status=item_status, call_id=call_id
                )
                if not won[0] and group_id is not None:
                    uow.groups.set_member_role(group_id, call_id, "superseded")

            return finish

        def on_retry(_error: ProviderError, _attempt: int) -> None:
            progress.retrying += 1
            if on_progress:
                on_progress(progress)

        async def process(item: ClaimedItem) -> ItemOutcome:
            won = [True]
            limit = provider_limits.get(item.provider)
            async with limit if limit is not None else contextlib.nullcontext():
                progress.in_flight += 1
                try:
                    result = await self.inference.run(
                        item.prompt,
                        provider=item.provider,
                        model=item.model,
                        options=options,
                        preprocess_config=preprocess,
                        group_id=group_id,
                        position=item.position,
                        dedup=dedup,
                        retry=retry,
                        metadata={
                            "batch_id": job_id,
                            "job_item_id": item.id,
                            "position": item.position,
                            "sample_index": item.sample_index,
                            "worker": worker,
                        },
                        on_final=finisher(item, won),
                        on_retry=on_retry,
                    )
                    if result.deduplicated:
                        # Another item's identical in-flight call answered this one; it
                        # made no record of its own, so point the item at that call.
                        status = {"success": "succeeded"}.get(result.status, "failed")
                        won[0] = await self._write(
                            lambda uow: JobRepository(uow.session).finish(
                                item.id, status=status, call_id=result.call_id
                            )
                        )
                    outcome = ItemOutcome(item, result, superseded=not won[0])
                except (ProviderError, ValueError) as exc:
                    # Raised before any call (e.g. provider not configured): record nothing,
                    # report it, and mark the item failed so the job can finish.
                    await self._write(
                        lambda uow: JobRepository(uow.session).fail_without_call(item.id)
                    )
                    outcome = ItemOutcome(item, None, error=exc)
                finally:
                    progress.in_flight -= 1
                    held.discard(item.id)
            if outcome.status == "succeeded":
                progress.succeeded += 1
            elif outcome.status == "cancelled":
                progress.cancelled += 1
            else:
                progress.failed += 1
            if on_progress:
                on_progress(progress)
            return outcome

        async def work() -> None:
            while (item := await next_item()) is not None:
                await queue.put(await process(item))

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(lease_s / 3)
                if held:
                    ids = list(held)
                    await self._write(
                        lambda uow, ids=ids: JobRepository(uow.session).renew(
                            worker, ids, lease_s=lease_s
                        )
                    )

        async def supervise(workers: list[asyncio.Task[None]]) -> None:
            try:
                await asyncio.gather(*workers)
            finally:
                await queue.put(None)

        if on_progress:
            on_progress(progress)
        workers = [asyncio.create_task(work()) for _ in range(concurrency)]
        beat = asyncio.create_task(heartbeat())
        supervisor = asyncio.create_task(supervise(workers))
        try:
            while (outcome := await queue.get()) is not None:
                yield outcome
            await supervisor  # re-raise a worker's unexpected error
        finally:
            beat.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, beat, supervisor, return_exceptions=True)
            leftovers = [item.id for item in local] + list(held)
            if leftovers:
                await self._write(lambda uow: JobRepository(uow.session).release(worker, leftovers))
            final = await self.counts(job_id)
            if final.open == 0 and job_id not in self._cancelled:
                await self._write(
                    lambda uow: JobRepository(uow.session).set_status(job_id, "completed")
                )


def _seconds_until(when: datetime) -> float:
    return max(0.0, (when - utcnow()).total_seconds())
