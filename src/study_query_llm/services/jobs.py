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
import itertools
import logging
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
from sqlalchemy.dialects import postgresql, sqlite
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from ..db.column_types import utcnow
from ..db.connection import UnitOfWork, is_transient_error, run_write
from ..db.models_v2 import Group
from ..db.repositories.jobs import ClaimedItem, JobCounts, JobRepository, PlannedItem
from ..providers import ProviderError
from ..providers.group import GROUP_PREFIX
from .inference import InferenceService, RetryPolicy, RunResult
from .preprocessing import PreprocessConfig
from .recorder import AfterWrite, RecordingError, WrittenTogether

log = logging.getLogger(__name__)

# How long batch bookkeeping (claims, leases, item outcomes) keeps retrying a database
# that went away (a PostgreSQL restart, a failover) before the run gives up.
DB_PATIENCE_S = 60.0
# A worker with nothing to claim while others hold items looks again at least this often.
IDLE_POLL_S = 0.5
# An item whose call could not be recorded is put back this many times, then failed.
MAX_CLAIMS = 3
# Job and group names are VARCHAR(200); leave room for a " (n)" suffix.
MAX_NAME_LENGTH = 190


@dataclass(frozen=True)
class Target:
    """A provider and model to send every prompt to."""

    provider: str
    model: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """`provider:model` (the model may itself contain colons, e.g. ``ollama:llama3:8b``).

        A provider group's id has a colon of its own: ``group:NAME:model`` (``auto`` lets
        the group choose), or just ``group:NAME``, which means ``group:NAME:auto``.
        """
        text = text.strip()
        if text.startswith(GROUP_PREFIX):
            name, sep, model = text[len(GROUP_PREFIX) :].partition(":")
            if not name.strip():
                raise ValueError(f"target {text!r} must look like group:NAME[:model]")
            return cls(f"{GROUP_PREFIX}{name.strip()}", model.strip() if sep else "auto")
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

    def __init__(
        self, engine: Engine, inference: InferenceService, *, db_patience_s: float = DB_PATIENCE_S
    ) -> None:
        self.engine = engine
        self.inference = inference
        self.db_patience_s = db_patience_s
        self._cancelled: set[int] = set()
        self._runs: dict[int, set[_Run]] = {}

    # --- database helpers (off the event loop) -------------------------------------------

    async def _patiently(self, work: Callable[[], Any]) -> Any:
        """Run `work` in a thread; ride out a database that is briefly unreachable."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient_error),
            wait=wait_exponential(multiplier=0.1, min=0.1, max=2.0),
            stop=stop_after_delay(self.db_patience_s),
            before_sleep=_log_db_retry,
            reraise=True,
        )
        return await retrying(asyncio.to_thread, work)

    async def _write(self, fn: Callable[[UnitOfWork], Any]) -> Any:
        return await self._patiently(lambda: run_write(self.engine, fn))

    async def _read(self, fn: Callable[[UnitOfWork], Any]) -> Any:
        def work() -> Any:
            with UnitOfWork(self.engine) as uow:
                return fn(uow)

        return await self._patiently(work)

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
        # PostgreSQL text cannot hold NUL: store U+FFFD instead, on every database alike
        # (as the recorder does), rather than fail the whole batch on PostgreSQL only.
        prompts = [str(p).replace("\x00", "\ufffd") for p in prompts]
        if not prompts:
            raise ValueError("the batch has no prompts")
        blank = [i for i, p in enumerate(prompts) if not str(p).strip()]
        if blank:
            raise ValueError(f"prompt {blank[0] + 1} is empty")
        for target in targets:
            self.inference.provider(target.provider)  # unknown or unconfigured: fail now
        from ..providers.base import CompletionOptions

        CompletionOptions.parse("batch", dict(options or {}))
        if n_samples < 1:
            raise ValueError("n_samples must be at least 1")
        if not targets:
            raise ValueError("a batch needs at least one provider:model target")
        name = (name or "").strip() or f"batch {utcnow():%Y-%m-%d %H:%M:%S}"
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"the batch name is longer than {MAX_NAME_LENGTH} characters")
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
            # Every batch gets a group of its own: a name already taken (a rerun with the
            # same --group, two batches started in the same second) gets a " (2)" suffix.
            group_id, unique_name = _new_group(
                uow, "batch", name, description=f"{total} planned calls", metadata={"spec": spec}
            )
            jobs = JobRepository(uow.session)
            job_id = jobs.create(unique_name, spec, group_id=group_id, total_items=total)
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
        """Stop a job now; returns how many pending items were cancelled.

        Pending items become cancelled and the job's status `cancelled`. Runs of the job in
        this service stop at once: calls in flight are abandoned (each is recorded with
        status `cancelled`) and the items they held are cancelled too. Runs elsewhere (other
        processes) stop claiming and end when their calls in flight finish. `reopen` and
        `run_job` finish a cancelled job later.
        """

        def cancel(uow: UnitOfWork) -> int:
            repo = JobRepository(uow.session)
            repo.get(job_id)  # JobNotFoundError for an unknown id
            # A completed job stays completed: there is nothing left to stop.
            repo.set_status(job_id, "cancelled", only_from=("pending", "running"))
            return repo.cancel_open(job_id)

        # The record first, then the runs: a run that stops sees the job cancelled, and
        # the count is of the items this call cancelled (not those a stopping run gave back).
        cancelled = await self._write(cancel)
        self._cancelled.add(job_id)
        for run in list(self._runs.get(job_id, ())):
            run.stop()
        return cancelled

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
        preprocess: PreprocessConfig | None = None,
        worker: str | None = None,
        lease_s: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> AsyncIterator[ItemOutcome]:
        """Create a job and run it; yields outcomes as items finish."""
        job_id = await self.create_job(
            prompts,
            targets,
            n_samples=n_samples,
            options=options,
            name=name,
            preprocess=preprocess,
            dedup=dedup,
        )
        async for outcome in self.run_job(
            job_id,
            concurrency=concurrency,
            per_provider=per_provider,
            on_progress=on_progress,
            worker=worker,
            lease_s=lease_s,
            retry=retry,
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
        for (until their lease runs out, when this worker may take them over). This run
        holds at most 2 x `concurrency` claimed items at a time; memory stays bounded
        however large the job. A cancelled job does not run until it is reopened.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not lease_s > 0:
            raise ValueError("the lease must be longer than 0 seconds")
        worker = worker or default_worker_id()
        self._cancelled.discard(job_id)
        job = await self.job(job_id)
        if job["status"] == "cancelled":
            return
        spec = job["spec_json"]
        counts: JobCounts = job["counts"]
        options = dict(spec.get("options") or {})
        preprocess = PreprocessConfig(**spec["preprocess"]) if spec.get("preprocess") else None
        dedup = bool(spec.get("dedup"))
        group_id = job["group_id"]
        started = await self._write(
            lambda uow: JobRepository(uow.session).set_status(
                job_id, "running", only_from=("pending", "running", "completed")
            )
        )
        if not started:  # cancelled since it was read above
            return

        progress = BatchProgress(total=counts.total, already_done=counts.finished)
        queue: asyncio.Queue[ItemOutcome | None] = asyncio.Queue(maxsize=concurrency * 2)
        local: deque[ClaimedItem] = deque()  # claimed, not yet started
        held: set[int] = set()  # claimed by this run and not finished: local + started
        claiming: set[asyncio.Task[list[ClaimedItem]]] = set()
        claim_lock = asyncio.Lock()
        provider_limits = {
            name: asyncio.Semaphore(limit) for name, limit in (per_provider or {}).items()
        }
        exhausted = asyncio.Event()
        run = _Run(asyncio.get_running_loop())
        idle_poll_s = min(IDLE_POLL_S, max(lease_s / 4, 0.05))

        def stopping() -> bool:
            return run.stopped or job_id in self._cancelled

        def register(task: asyncio.Task[list[ClaimedItem]]) -> None:
            """Take a finished claim's items into the run (once per claim)."""
            if task not in claiming:
                return
            claiming.discard(task)
            if not task.cancelled() and task.exception() is None:
                # Even when the worker that waited for it was cancelled meanwhile: the
                # claim committed, so the items are ours to finish or give back.
                held.update(item.id for item in task.result())
                local.extend(task.result())

        async def claim() -> list[ClaimedItem]:
            # Only when no claimed item is waiting, so this run holds at most
            # 2 x concurrency items: bounded, and the rest stays for other workers.
            task = asyncio.ensure_future(
                self._write(
                    lambda uow: JobRepository(uow.session).claim(
                        job_id, worker, limit=concurrency, lease_s=lease_s
                    )
                )
            )
            claiming.add(task)
            task.add_done_callback(register)
            claimed = await asyncio.shield(task)
            register(task)
            return claimed

        async def next_item() -> ClaimedItem | None:
            async with claim_lock:
                while not local:
                    if stopping() or exhausted.is_set():
                        return None
                    if await claim():
                        break
                    # Nothing to take now. Items others hold (or a dead worker left) come
                    # back when their leases run out; look again until none are left.
                    waiting = await self._read(
                        lambda uow: JobRepository(uow.session).next_lease_expiry(
                            job_id, exclude_ids=list(held)
                        )
                    )
                    if waiting is None:
                        exhausted.set()
                        return None
                    await asyncio.sleep(min(_seconds_until(waiting) + 0.05, idle_poll_s))
                if stopping():
                    return None
                return local.popleft()

        def finisher(item: ClaimedItem, won: list[bool]) -> AfterWrite:
            return _FinishItem(item.id, won, group_id)

        def on_retry(_error: ProviderError, _attempt: int) -> None:
            progress.retrying += 1
            if on_progress:
                on_progress(progress)

        async def process(item: ClaimedItem) -> ItemOutcome | None:
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
                except RecordingError as exc:
                    if exc.call_id is not None:
                        # The raw_calls row (and the item's outcome) landed; v1 did not.
                        outcome = ItemOutcome(item, None, error=exc)
                    elif item.claims < MAX_CLAIMS:
                        # The call was made but could not be recorded even after retries:
                        # give the item back so it is called (and recorded) again.
                        log.warning("batch %s item %s: %s; retrying it", job_id, item.id, exc)
                        await self._write(
                            lambda uow: JobRepository(uow.session).release(worker, [item.id])
                        )
                        held.discard(item.id)
                        exhausted.clear()
                        return None
                    else:
                        await self._write(
                            lambda uow: JobRepository(uow.session).fail_without_call(item.id)
                        )
                        outcome = ItemOutcome(item, None, error=exc)
                finally:
                    progress.in_flight -= 1
            # Only now is the item off our hands; a cancelled call leaves it held, so the
            # clean-up below gives it back (or cancels it).
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
            try:
                while (item := await next_item()) is not None:
                    outcome = await process(item)
                    if outcome is not None:
                        await queue.put(outcome)
            except asyncio.CancelledError:
                if run.stopped:
                    return  # cancel(): the call in flight was recorded as cancelled
                raise

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(lease_s / 3)
                if not held:
                    continue
                ids = list(held)
                try:
                    await self._write(
                        lambda uow, ids=ids: JobRepository(uow.session).renew(
                            worker, ids, lease_s=lease_s
                        )
                    )
                except Exception as exc:  # keep beating: a missed renewal is not fatal
                    log.warning("batch %s: could not renew leases (%s)", job_id, exc)

        async def supervise(workers: list[asyncio.Task[None]]) -> None:
            try:
                await asyncio.gather(*workers)
            finally:
                await queue.put(None)

        async def clean_up(
            workers: list[asyncio.Task[None]],
            beat: asyncio.Task[None],
            supervisor: asyncio.Task[None],
        ) -> None:
            beat.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, beat, return_exceptions=True)
            supervisor.cancel()  # it may be stuck handing the end marker to a gone consumer
            unfinished = list(claiming)
            await asyncio.gather(supervisor, *unfinished, return_exceptions=True)
            for task in unfinished:
                register(task)
            leftovers = list(held)
            cancelled = job_id in self._cancelled or run.stopped

            def give_back(uow: UnitOfWork) -> None:
                repo = JobRepository(uow.session)
                repo.release(worker, leftovers)
                if cancelled:
                    repo.cancel_open(job_id)
                    repo.set_status(job_id, "cancelled", only_from=("pending", "running"))
                elif repo.counts(job_id).open == 0:
                    # Completed, unless someone cancelled it meanwhile (another process).
                    repo.set_status(job_id, "completed", only_from=("running",))

            await self._write(give_back)

        if on_progress:
            on_progress(progress)
        self._runs.setdefault(job_id, set()).add(run)
        workers = [asyncio.create_task(work()) for _ in range(concurrency)]
        run.tasks = workers
        beat = asyncio.create_task(heartbeat())
        supervisor = asyncio.create_task(supervise(workers))
        try:
            while (outcome := await queue.get()) is not None:
                yield outcome
            await supervisor  # re-raise a worker's unexpected error
        finally:
            self._runs.get(job_id, set()).discard(run)
            await _shielded(clean_up(workers, beat, supervisor))


class _Run:
    """One `run_job` in this process, so `cancel()` can stop it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.tasks: list[asyncio.Task[None]] = []
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        for task in self.tasks:
            with contextlib.suppress(RuntimeError):  # its event loop has closed meanwhile
                self.loop.call_soon_threadsafe(task.cancel)


async def _shielded(coro: Any) -> None:
    """Run `coro` to the end even if the caller is cancelled meanwhile (then re-raise)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _new_group(
    uow: UnitOfWork, group_type: str, name: str, *, description: str, metadata: dict[str, Any]
) -> tuple[int, str]:
    """Create a group named `name`, or `name (2)`, `name (3)`... if taken; (id, name)."""
    dialect = uow.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for n in itertools.count(1):
        candidate = name if n == 1 else f"{name} ({n})"
        group_id = uow.session.execute(
            insert(Group)
            .values(
                group_type=group_type,
                name=candidate,
                description=description,
                metadata_json=metadata,
            )
            .on_conflict_do_nothing(index_elements=["group_type", "name"])
            .returning(Group.id)
        ).scalar()
        if group_id is not None:
            return int(group_id), candidate
    raise AssertionError("unreachable")


def _log_db_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("batch bookkeeping: database unavailable (%s); retrying", error)


def _seconds_until(when: datetime) -> float:
    return max(0.0, (when - utcnow()).total_seconds())


_ITEM_STATUS = {"success": "succeeded", "cancelled": "cancelled"}


@dataclass(eq=False)
class _FinishItem(WrittenTogether):
    """Marks a batch item done in the transaction that records its final call. The items
    finished in one transaction are marked together; `won[0]` says whether this call
    became the item's answer (False: another worker's call finished the item first, and
    this call's group membership is marked superseded)."""

    item_id: int
    won: list[bool]
    group_id: int | None

    @classmethod
    def write_all(cls, uow: UnitOfWork, entries: list[tuple[Any, int, str]]) -> None:
        won = JobRepository(uow.session).finish_many(
            [
                (finish.item_id, _ITEM_STATUS.get(status, "failed"), call_id)
                for finish, call_id, status in entries
            ]
        )
        for (finish, call_id, _status), item_won in zip(entries, won, strict=True):
            finish.won[0] = item_won
            if not item_won and finish.group_id is not None:
                uow.groups.set_member_role(finish.group_id, call_id, "superseded")
