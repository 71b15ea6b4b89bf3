"""Writes call records without blocking the event loop, many per transaction (group commit).

Callers `await recorder.record(...)` and get the new `raw_calls` id once the row is
committed. A single writer task collects whatever records are waiting, writes them in one
transaction off the event loop (v2 row, v1 row for successes, group membership, and any
extra work the caller attached, such as marking a batch item done), and resolves each
caller's future. Transient database errors are retried by `run_write`; if a whole batch
still fails, each record is written on its own so one bad record cannot sink the others,
and every failure reaches its caller as a `RecordingError`. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Engine

from ..db.connection import UnitOfWork, json_text, run_write
from ..db.records import NewCall, NewRun
from ..logging_setup import log_provider_call

log = logging.getLogger(__name__)

# after(uow, call_id, status): extra work in the same transaction as the record
AfterWrite = Callable[[UnitOfWork, int, str], None]


class WrittenTogether:
    """Extra work (an `AfterWrite`) whose instances of one class, queued in one
    transaction, are done together by `write_all` (one statement rather than one each)."""

    def __call__(self, uow: UnitOfWork, call_id: int, status: str) -> None:
        type(self).write_all(uow, [(self, call_id, status)])

    @classmethod
    def write_all(cls, uow: UnitOfWork, entries: list[tuple[Any, int, str]]) -> None:
        """Do the work of every (instance, call id, status) entry, in the order given."""
        raise NotImplementedError


class RecordingError(RuntimeError):
    """A call could not be recorded. `call_id` is set when the v2 row landed but v1 did not."""

    def __init__(self, message: str, *, call_id: int | None = None) -> None:
        super().__init__(message)
        self.call_id = call_id


@dataclass
class _Pending:
    call: NewCall
    run: NewRun | None
    group_id: int | None
    position: int | None
    role: str | None
    after: AfterWrite | None
    future: asyncio.Future[int] = field(repr=False)


class CallRecorder:
    """Group-commit writer of `raw_calls` (v2) and `inference_runs` (v1) rows."""

    def __init__(self, engine: Engine, *, max_batch: int = 500) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0  # how many write transactions ran (for tests and benchmarks)

    def _ensure_writer(self) -> asyncio.Queue[_Pending | None]:
        if self._queue is None or self._writer is None or self._writer.done():
            self._queue = asyncio.Queue()
            self._writer = asyncio.get_running_loop().create_task(self._drain(self._queue))
        return self._queue

    async def record(
        self,
        call: NewCall,
        *,
        run: NewRun | None = None,
        group_id: int | None = None,
        position: int | None = None,
        role: str | None = None,
        after: AfterWrite | None = None,
    ) -> int:
        """Write one call (and its v1 row, group membership, extra work); return its id."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._ensure_writer().put_nowait(
            _Pending(sanitise(call), _sanitise_run(run), group_id, position, role, after, future)
        )
        call_id = await asyncio.shield(future)
        log_provider_call(call, call_id)
        return call_id

    async def aclose(self) -> None:
        """Write what is queued, then stop the writer task."""
        if self._queue is not None and self._writer is not None and not self._writer.done():
            self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._queue = None
        self._writer = None

    async def _drain(self, queue: asyncio.Queue[_Pending | None]) -> None:
        while True:
            first = await queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
            results = await asyncio.to_thread(self._write, batch)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
            if stop:
                return

    # --- runs in a worker thread ---------------------------------------------------------

    def _write(self, batch: list[_Pending]) -> list[int | BaseException]:
        try:
            self.transactions += 1
            return list(run_write(self.engine, lambda uow: _write_all(uow, batch)))
        except Exception as exc:
            if len(batch) == 1:
                return [self._write_alone(batch[0], exc)]
            log.warning(
                "recording %d calls together failed (%s); writing one by one", len(batch), exc
            )
            return [self._write_alone(pending, exc) for pending in batch]

    def _write_alone(self, pending: _Pending, first_error: BaseException) -> int | BaseException:
        try:
            self.transactions += 1
            return run_write(self.engine, lambda uow: _write_all(uow, [pending])[0])
        except Exception as exc:
            error = exc
        if pending.run is None:
            return RecordingError(f"could not record the call: {error}")
        # Keep the source of truth: v2 (with group and extra work) without the v1 row.
        try:
            self.transactions += 1
            call_id = run_write(
                self.engine, lambda uow: _write_all(uow, [replace(pending, run=None)])[0]
            )
        except Exception as exc:
            return RecordingError(f"could not record the call: {exc}")
        return RecordingError(
            f"recorded call {call_id} in raw_calls, but its inference_runs row failed: {error}",
            call_id=call_id,
        )


def json_safe(value: Any) -> tuple[Any, bool]:
    """`value` with what no database's JSON accepts replaced; and whether anything was.

    PostgreSQL's JSONB refuses the NUL character and neither database takes NaN or
    infinity, so NUL becomes U+FFFD and non-finite floats become null; the record notes
    that it was sanitised rather than losing the call.
    """
    if isinstance(value, str):
        return (value.replace("\x00", "\ufffd"), True) if "\x00" in value else (value, False)
    if isinstance(value, float):
        return (
            (None, True)
            if value != value or value in (float("inf"), float("-inf"))
            else (
                value,
                False,
            )
        )
    if isinstance(value, dict):
        changed = False
        out = {}
        for key, item in value.items():
            safe_key, key_changed = json_safe(key) if isinstance(key, str) else (key, False)
            safe_item, item_changed = json_safe(item)
            out[safe_key] = safe_item
            changed = changed or key_changed or item_changed
        return out, changed
    if isinstance(value, list | tuple):
        pairs = [json_safe(item) for item in value]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    return value, False


def _surely_storable(value: Any) -> bool:
    """True when `value` certainly needs no `json_safe` changes: the database's own JSON
    encoding (C, NaN and infinity refused) takes it and no NUL came out. (False may be a
    false alarm, such as text containing a literal backslash-u0000; `json_safe` then
    changes nothing.)"""
    try:
        encoded = json_text(value)
    except (TypeError, ValueError):
        return False
    return "\\u0000" not in encoded


def sanitise(call: NewCall) -> NewCall:
    """The call with its JSON fields made storable (see `json_safe`)."""
    if all(
        _surely_storable(getattr(call, name))
        for name in ("request_json", "response_json", "error_json", "metadata_json")
    ):
        return call
    fields: dict[str, Any] = {}
    changed = False
    for name in ("request_json", "response_json", "error_json", "metadata_json"):
        safe, was_changed = json_safe(getattr(call, name))
        fields[name] = safe
        changed = changed or was_changed
    if not changed:
        return call
    fields["metadata_json"] = {**(fields["metadata_json"] or {}), "sanitised": True}
    return replace(call, **fields)


def _sanitise_run(run: NewRun | None) -> NewRun | None:
    if run is None:
        return None
    prompt, p_changed = json_safe(run.prompt)
    response, r_changed = json_safe(run.response)
    metadata, m_changed = json_safe(run.metadata_json)
    if not (p_changed or r_changed or m_changed):
        return run
    return replace(run, prompt=prompt, response=response, metadata_json=metadata)


def _write_all(uow: UnitOfWork, batch: list[_Pending]) -> list[int]:
    ids = uow.calls.add_many([pending.call for pending in batch])
    runs: list[NewRun] = []
    placements: list[tuple[int, int, int | None, str | None]] = []
    for pending, call_id in zip(batch, ids, strict=True):
        if pending.run is not None:
            meta: dict[str, Any] = dict(pending.run.metadata_json or {})
            meta["raw_call_id"] = call_id
            runs.append(replace(pending.run, metadata_json=meta))
        if pending.group_id is not None:
            placements.append((pending.group_id, call_id, pending.position, pending.role))
    uow.groups.place_new_calls(placements)  # one statement for the whole batch
    together: dict[type, list[tuple[Any, int, str]]] = {}
    for pending, call_id in zip(batch, ids, strict=True):
        after = pending.after
        if isinstance(after, WrittenTogether):
            together.setdefault(type(after), []).append((after, call_id, pending.call.status))
        elif after is not None:  # may look at the memberships placed above
            after(uow, call_id, pending.call.status)
    for kind, entries in together.items():
        kind.write_all(uow, entries)
    if runs:
        uow.runs.add_many(runs)
    return ids
