"""Batch jobs and their items: create with planned items, claim with leases, finish once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from study_query_llm.db.column_types import utcnow
from study_query_llm.db.models_jobs import BatchJob, BatchJobItem

INSERT_CHUNK = 5_000

_ITEMS = BatchJobItem.__table__
# Finishing items runs with every recorded call, inside the transaction that records it:
# plain table statements, built once, with no ORM session bookkeeping. Which items can
# still be finished (locked, on PostgreSQL, in id order):
_FINISHABLE = (
    select(_ITEMS.c.id)
    .where(
        _ITEMS.c.id.in_(bindparam("ids", expanding=True)),
        _ITEMS.c.status.in_(("pending", "claimed"))
        | ((_ITEMS.c.status == "cancelled") & _ITEMS.c.call_id.is_(None)),
    )
    .order_by(_ITEMS.c.id)
    .with_for_update()
)
# ...and finishing the ones found, by id alone.
_FINISH_FOUND = (
    update(_ITEMS)
    .where(_ITEMS.c.id == bindparam("item_id"))
    .values(
        status=bindparam("new_status"),
        call_id=bindparam("new_call_id"),
        claimed_by=None,
        lease_expires_at=None,
        updated_at=bindparam("now"),
    )
)


@dataclass(frozen=True)
class PlannedItem:
    """One call a job will make."""

    position: int
    prompt: str
    provider: str
    model: str
    sample_index: int = 0


@dataclass(frozen=True)
class ClaimedItem:
    """An item a worker holds a lease on."""

    id: int
    position: int
    prompt: str
    provider: str
    model: str
    sample_index: int
    claims: int


@dataclass(frozen=True)
class JobCounts:
    """Items of a job by status."""

    total: int
    pending: int = 0
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def open(self) -> int:
        return self.pending + self.claimed


class JobNotFoundError(LookupError):
    """No batch job has this id."""


class JobRepository:
    """Reads and writes `batch_jobs` and `batch_job_items`."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(
        self, name: str, spec: dict[str, Any], *, group_id: int | None, total_items: int
    ) -> int:
        job = BatchJob(name=name, spec_json=spec, group_id=group_id, total_items=total_items)
        self.session.add(job)
        self.session.flush()
        return job.id

    def add_items(self, job_id: int, items: Iterable[PlannedItem]) -> int:
        """Insert planned items in chunks (bounded memory); returns how many."""
        count = 0
        iterator = iter(items)
        while chunk := list(islice(iterator, INSERT_CHUNK)):
            self.session.execute(
                insert(BatchJobItem),
                [
                    {
                        "job_id": job_id,
                        "position": item.position,
                        "prompt": item.prompt,
                        "provider": item.provider,
                        "model": item.model,
                        "sample_index": item.sample_index,
                        "status": "pending",
                        "claims": 0,
                    }
                    for item in chunk
                ],
            )
            count += len(chunk)
        return count

    def get(self, job_id: int) -> BatchJob:
        job = self.session.get(BatchJob, job_id)
        if job is None:
            raise JobNotFoundError(f"no batch job with id {job_id}")
        return job

    def list_jobs(self, limit: int = 50) -> list[BatchJob]:
        stmt = select(BatchJob).order_by(BatchJob.id.desc()).limit(limit)
        return list(self.session.scalars(stmt))

    def set_status(
        self, job_id: int, status: str, *, only_from: Iterable[str] | None = None
    ) -> bool:
        """Set the job's status (only when it is one of `only_from`, if given)."""
        stmt = update(BatchJob).where(BatchJob.id == job_id)
        if only_from is not None:
            stmt = stmt.where(BatchJob.status.in_(list(only_from)))
        result = self.session.execute(stmt.values(status=status, updated_at=utcnow()))
        return (result.rowcount or 0) == 1

    def counts(self, job_id: int) -> JobCounts:
        rows = self.session.execute(
            select(BatchJobItem.status, func.count())
            .where(BatchJobItem.job_id == job_id)
            .group_by(BatchJobItem.status)
        ).all()
        by_status = {status: int(n) for status, n in rows}
        return JobCounts(total=sum(by_status.values()), **by_status)

    def claim(
        self, job_id: int, worker: str, *, limit: int, lease_s: float, now: datetime | None = None
    ) -> list[ClaimedItem]:
        """Take up to `limit` open items (pending, or claimed with an expired lease).

        PostgreSQL: `FOR UPDATE SKIP LOCKED`, so concurrent workers never block on or take
        the same rows. SQLite: the caller's write transaction (BEGIN IMMEDIATE) serialises
        claims.
        """
        now = now or utcnow()

        def claimable(status: str, n: int) -> list[int]:
            # One status per query, so both walk the (job_id, status, position) index: a
            # single query with an OR walks every finished item first on SQLite, which
            # makes each claim slower the further a large job has got.
            stmt = select(BatchJobItem.id).where(
                BatchJobItem.job_id == job_id, BatchJobItem.status == status
            )
            if status == "claimed":
                stmt = stmt.where(BatchJobItem.lease_expires_at < now)
            stmt = stmt.order_by(BatchJobItem.position).limit(n).with_for_update(skip_locked=True)
            return list(self.session.scalars(stmt))

        # Items whose lease ran out (their worker died) first, then pending ones.
        ids = claimable("claimed", limit)
        if len(ids) < limit:
            ids += claimable("pending", limit - len(ids))
        if not ids:
            return []
        rows = self.session.execute(
            update(BatchJobItem)
            .where(BatchJobItem.id.in_(ids))
            .values(
                status="claimed",
                claimed_by=worker,
                lease_expires_at=now + timedelta(seconds=lease_s),
                claims=BatchJobItem.claims + 1,
                updated_at=now,
            )
            .returning(
                BatchJobItem.id,
                BatchJobItem.position,
                BatchJobItem.prompt,
                BatchJobItem.provider,
                BatchJobItem.model,
                BatchJobItem.sample_index,
                BatchJobItem.claims,
            )
        ).all()
        return sorted((ClaimedItem(*row) for row in rows), key=lambda item: item.position)

    def renew(self, worker: str, item_ids: Iterable[int], *, lease_s: float) -> int:
        """Extend this worker's leases on items it still holds.

        Rows another transaction has locked (on PostgreSQL: the recorder finishing them
        right now) are skipped, not waited for: a renewal that waited while holding
        other rows could deadlock with a recorder finishing items in another order, and
        an item being finished needs no longer lease.
        """
        ids = list(item_ids)
        if not ids:
            return 0
        now = utcnow()
        mine = (
            BatchJobItem.id.in_(ids),
            BatchJobItem.status == "claimed",
            BatchJobItem.claimed_by == worker,
        )
        if self.session.get_bind().dialect.name == "postgresql":
            held = (
                select(BatchJobItem.id)
                .where(*mine)
                .order_by(BatchJobItem.id)
                .with_for_update(skip_locked=True)
            )
            mine = (BatchJobItem.id.in_(held.scalar_subquery()),)
        # (SQLite has no row locks: its one writer at a time cannot deadlock.)
        result = self.session.execute(
            update(BatchJobItem)
            .where(*mine)
            .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount or 0

    def release(self, worker: str, item_ids: Iterable[int]) -> int:
        """Give items back (pending) without an outcome, e.g. when a run is cancelled."""
        ids = list(item_ids)
        if not ids:
            return 0
        result = self.session.execute(
            update(BatchJobItem)
            .where(
                BatchJobItem.id.in_(ids),
                BatchJobItem.status == "claimed",
                BatchJobItem.claimed_by == worker,
            )
            .values(status="pending", claimed_by=None, lease_expires_at=None, updated_at=utcnow())
        )
        return result.rowcount or 0

    def finish(self, item_id: int, *, status: str, call_id: int) -> bool:
        """Set an item's outcome, once: the first finisher wins, later ones get False.

        An item cancelled before any call finished it (`call_id` still NULL) can still be
        finished: a call that was already under way when the job was cancelled and then
        succeeded is the item's answer, and reopening the job must not call it again.
        """
        return self.finish_many([(item_id, status, call_id)])[0]

    def finish_many(self, outcomes: Sequence[tuple[int, str, int]]) -> list[bool]:
        """`finish` for many (item id, status, call id) at once, in two statements: which
        of the items can still be finished (locked, on PostgreSQL, in id order), then one
        batched update of those. Returns, for each outcome in order, whether it won (the
        first outcome for an item wins; later ones, and items already finished, lose)."""
        if not outcomes:
            return []
        connection = self.session.connection()
        open_ids = set(
            connection.scalars(_FINISHABLE, {"ids": sorted({item for item, *_ in outcomes})})
        )
        won = []
        updates = []
        now = utcnow()
        for item_id, status, call_id in outcomes:
            won.append(item_id in open_ids)
            if won[-1]:
                open_ids.discard(item_id)
                updates.append(
                    {"item_id": item_id, "new_status": status, "new_call_id": call_id, "now": now}
                )
        if updates:
            connection.execute(_FINISH_FOUND, updates)
        return won

    def cancel_open(self, job_id: int) -> int:
        """Mark every pending item cancelled (claimed ones finish or are released)."""
        result = self.session.execute(
            update(BatchJobItem)
            .where(BatchJobItem.job_id == job_id, BatchJobItem.status == "pending")
            .values(status="cancelled", updated_at=utcnow())
        )
        return result.rowcount or 0

    def next_lease_expiry(
        self,
        job_id: int,
        *,
        exclude_worker: str | None = None,
        exclude_ids: Iterable[int] = (),
    ) -> datetime | None:
        """When the earliest lease on this job's claimed items runs out; None if none are.

        `exclude_ids`: items the caller is working on itself (so not worth waiting for).
        """
        stmt = select(func.min(BatchJobItem.lease_expires_at)).where(
            BatchJobItem.job_id == job_id, BatchJobItem.status == "claimed"
        )
        if exclude_worker is not None:
            stmt = stmt.where(BatchJobItem.claimed_by != exclude_worker)
        ids = list(exclude_ids)
        if ids:
            stmt = stmt.where(BatchJobItem.id.not_in(ids))
        return self.session.scalar(stmt)

    def fail_without_call(self, item_id: int) -> bool:
        """Finish an item as failed when no call could even be attempted."""
        result = self.session.execute(
            update(BatchJobItem)
            .where(BatchJobItem.id == item_id, BatchJobItem.status.in_(("pending", "claimed")))
            .values(status="failed", claimed_by=None, lease_expires_at=None, updated_at=utcnow())
        )
        return (result.rowcount or 0) == 1

    def items(
        self, job_id: int, *, after_position: int = -1, limit: int = 1000
    ) -> list[BatchJobItem]:
        """Items in position order, a page at a time."""
        stmt = (
            select(BatchJobItem)
            .where(BatchJobItem.job_id == job_id, BatchJobItem.position > after_position)
            .order_by(BatchJobItem.position)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))
