"""Import a legacy v1 `inference_runs` table into v2 `raw_calls`, resumably and without duplicates.

```python
with LegacyDatabase("sqlite:///old/app.db") as legacy:
    report = LegacyImporter(legacy, get_engine(target_url)).run()
```

Each legacy row becomes one successful chat call: ``request_json = {"prompt": ...}``,
``response_json = {"text": ...}``, its tokens (as `total_tokens`), latency and original
`created_at`. Its metadata keeps the original keys and adds ``legacy`` (source name,
row id, batch id); metadata that is not a JSON object, or already has a ``legacy`` key,
is kept whole under ``legacy.metadata`` instead. A missing model becomes ``"unknown"``.
Text the target cannot store (NUL characters) becomes U+FFFD, noted as
``legacy.sanitised``.

Rows are read in id order, `chunk_size` at a time (rows already imported are skipped
by id, without being read in full); each chunk's calls and their `legacy_calls` entries
are written in one transaction, so a crash loses at most the chunk in flight and a rerun
skips every row already imported. Then each legacy `batch_id`
becomes a ``batch`` group whose members are in the order the rows were made
(created_at, then id), again in chunked transactions that a rerun completes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from study_query_llm.db.connection import UnitOfWork, run_write
from study_query_llm.db.legacy import LegacyDatabase, LegacyRow, database_identity
from study_query_llm.db.models_legacy import LegacyBatch, LegacyCall, LegacySource
from study_query_llm.db.models_v2 import Group, GroupMember
from study_query_llm.db.records import NewCall

LEGACY_KEY = "legacy"
UNKNOWN = "unknown"
GROUP_TYPE = "batch"
GROUP_ROLE = "final"
GROUP_NAME_LENGTH = 200
DEFAULT_CHUNK_SIZE = 2000


class LegacyImportError(RuntimeError):
    """The import cannot go ahead (for example, the source is the target itself)."""


@dataclass(frozen=True)
class ImportProgress:
    """Where an import stands: `phase` is ``"calls"`` or ``"groups"``."""

    phase: str
    done: int
    total: int
    imported: int
    skipped: int


@dataclass
class ImportReport:
    """What an import did."""

    source: str
    source_rows: int = 0
    imported: int = 0
    skipped: int = 0
    sanitised: int = 0
    batched_rows: int = 0
    batches: int = 0
    groups_created: int = 0
    members_added: int = 0
    members_present: int = 0
    unmapped_members: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.source_rows / self.seconds if self.seconds > 0 else 0.0


def storable(text: str | None) -> str | None:
    """`text` as both databases can store it: NUL (which PostgreSQL refuses) as U+FFFD."""
    if text is None or "\x00" not in text:
        return text
    return text.replace("\x00", "\ufffd")


def storable_json(value: Any) -> Any:
    """`value` with every string (keys too) made `storable`."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable_json(k): storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # neither database's JSON has NaN or infinity
    return value


def v2_metadata(row: LegacyRow, source: str, *, sanitised: bool = False) -> dict[str, Any]:
    """The `metadata_json` of the call made from `row` (see the module docstring)."""
    provenance: dict[str, Any] = {"source": source, "id": row.id, "batch_id": row.batch_id}
    if sanitised:
        provenance["sanitised"] = True
    original = row.metadata
    if isinstance(original, dict) and LEGACY_KEY not in original:
        return {**original, LEGACY_KEY: provenance}
    return {LEGACY_KEY: {**provenance, "metadata": original}}


def original_metadata(metadata_json: dict[str, Any]) -> Any:
    """The legacy metadata a call made by this import started from (`v2_metadata` undone)."""
    provenance = metadata_json.get(LEGACY_KEY) or {}
    if "metadata" in provenance:
        return provenance["metadata"]
    return {k: v for k, v in metadata_json.items() if k != LEGACY_KEY}


def to_new_call(row: LegacyRow, source: str) -> NewCall:
    """The v2 call for one legacy row."""
    texts = (row.prompt, row.response, row.provider, row.model, row.batch_id)
    safe_meta = storable_json(row.metadata)
    sanitised = any(t is not None and "\x00" in t for t in texts) or safe_meta != row.metadata
    if sanitised:
        row = replace(
            row,
            prompt=storable(row.prompt) or "",
            response=storable(row.response),
            provider=storable(row.provider),
            model=storable(row.model),
            metadata=safe_meta,
            batch_id=storable(row.batch_id),
        )
    return NewCall(
        provider=row.provider or UNKNOWN,
        model=row.model or UNKNOWN,
        modality="chat",
        status="success",
        request_json={"prompt": row.prompt},
        response_json={"text": row.response},
        latency_ms=row.latency_ms,
        total_tokens=row.tokens,
        metadata_json=v2_metadata(row, source, sanitised=sanitised),
        created_at=row.created_at,
    )


def batch_group_name(batch_id: str) -> str:
    """The name of the group made for a legacy batch (before any `` (2)`` suffix)."""
    return f"v1 batch {batch_id}"[: GROUP_NAME_LENGTH - 8]


def source_id(engine: Engine, name: str, *, create: bool) -> int | None:
    """The `legacy_sources` id of the source called `name` (made when `create`)."""

    def find(uow: UnitOfWork) -> int | None:
        return uow.session.scalar(select(LegacySource.id).where(LegacySource.name == name))

    with UnitOfWork(engine) as uow:
        found = find(uow)
    if found is not None or not create:
        return found

    def make(uow: UnitOfWork) -> int:
        existing = find(uow)  # made meanwhile by another import of the same source
        if existing is not None:
            return existing
        source = LegacySource(name=name)
        uow.session.add(source)
        uow.session.flush()
        return source.id

    return run_write(engine, make)


class LegacyImporter:
    """Copies one legacy database into the v2 tables of `engine`'s database."""

    def __init__(
        self,
        legacy: LegacyDatabase,
        engine: Engine,
        *,
        source_name: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Callable[[ImportProgress], None] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("the chunk size must be at least 1")
        self.legacy = legacy
        self.engine = engine
        self.source_name = (source_name or "").strip() or legacy.identity
        self.chunk_size = chunk_size
        self.progress = progress

    def run(self) -> ImportReport:
        """Import every row not imported yet, then make or complete the batch groups."""
        if database_identity(self.engine.url) == self.legacy.identity:
            raise LegacyImportError(
                f"the legacy database is the target database ({self.legacy.shown}): this "
                "version writes inference_runs alongside raw_calls, so its rows are already "
                "there; point the source at the old v1 database"
            )
        started = time.perf_counter()
        report = ImportReport(source=self.source_name)
        if self.legacy.has_raw_calls:
            report.warnings.append(
                "the legacy database also has raw_calls (a v2 database?): its inference_runs "
                "rows may already be recorded as v2 calls there"
            )
        source_pk = source_id(self.engine, self.source_name, create=True)
        assert source_pk is not None
        self._import_calls(source_pk, report)
        self._import_groups(source_pk, report)
        report.seconds = time.perf_counter() - started
        return report

    # --- calls -----------------------------------------------------------------------------

    def _import_calls(self, source_pk: int, report: ImportReport) -> None:
        report.source_rows = self.legacy.count()
        self._tell("calls", 0, report.source_rows, report)
        done = 0
        for ids in self.legacy.id_chunks(self.chunk_size):
            imported = sanitised = 0
            missing = self._not_imported(source_pk, ids)
            if missing:  # only rows still to copy are read in full
                found = self.legacy.rows_by_id(missing)
                rows = [found[i] for i in missing if i in found]
                imported, sanitised = run_write(
                    self.engine, lambda uow, rows=rows: self._write_calls(uow, source_pk, rows)
                )
            done += len(ids)
            report.imported += imported
            report.skipped += len(ids) - imported
            report.sanitised += sanitised
            self._tell("calls", done, max(done, report.source_rows), report)
        report.source_rows = max(done, report.source_rows)

    def _not_imported(self, source_pk: int, ids: list[int]) -> list[int]:
        """The ids (sorted) that have no `legacy_calls` entry yet."""
        with UnitOfWork(self.engine) as uow:
            present = set(
                uow.session.scalars(
                    select(LegacyCall.legacy_id).where(
                        LegacyCall.source_id == source_pk,
                        LegacyCall.legacy_id.between(ids[0], ids[-1]),
                    )
                )
            )
        return [i for i in ids if i not in present]

    def _write_calls(
        self, uow: UnitOfWork, source_pk: int, rows: list[LegacyRow]
    ) -> tuple[int, int]:
        session = uow.session
        # Serialises two imports of one source on PostgreSQL (SQLite's write lock does it).
        session.get(LegacySource, source_pk, with_for_update=True)
        present = set(
            session.scalars(
                select(LegacyCall.legacy_id).where(
                    LegacyCall.source_id == source_pk,
                    LegacyCall.legacy_id.between(rows[0].id, rows[-1].id),
                )
            )
        )
        todo = [row for row in rows if row.id not in present]  # (re-checked under the lock)
        if not todo:
            return 0, 0
        calls = [to_new_call(row, self.source_name) for row in todo]
        call_ids = uow.calls.add_many(calls)
        _insert_many(
            session,
            LegacyCall.legacy_id,
            [
                {"source_id": source_pk, "legacy_id": row.id, "call_id": call_id}
                for row, call_id in zip(todo, call_ids, strict=True)
            ],
        )
        sanitised = sum(1 for c in calls if c.metadata_json and _was_sanitised(c.metadata_json))
        return len(todo), sanitised

    # --- batch groups ----------------------------------------------------------------------

    def _import_groups(self, source_pk: int, report: ImportReport) -> None:
        report.batched_rows = self.legacy.count_batched()
        if not report.batched_rows:
            return
        self._tell("groups", 0, report.batched_rows, report)
        done = 0
        entries = ((storable(b) or "", i, at) for b, i, at in self.legacy.batch_entries())
        for chunk in _positioned(entries, self.chunk_size):
            created, added, unmapped = run_write(
                self.engine, lambda uow, chunk=chunk: self._write_members(uow, source_pk, chunk)
            )
            done += len(chunk)
            report.batches += sum(1 for entry in chunk if entry.position == 0)
            report.groups_created += created
            report.members_added += added
            report.unmapped_members += unmapped
            report.members_present += len(chunk) - added - unmapped
            self._tell("groups", done, max(done, report.batched_rows), report)

    def _write_members(
        self, uow: UnitOfWork, source_pk: int, chunk: list[_Entry]
    ) -> tuple[int, int, int]:
        """Make missing groups and memberships; (groups made, members added, rows unmapped)."""
        session = uow.session
        session.get(LegacySource, source_pk, with_for_update=True)
        batch_ids = list(dict.fromkeys(entry.batch_id for entry in chunk))
        groups = dict(
            session.execute(
                select(LegacyBatch.batch_id, LegacyBatch.group_id).where(
                    LegacyBatch.source_id == source_pk, LegacyBatch.batch_id.in_(batch_ids)
                )
            ).all()
        )
        created = 0
        first_at = {}
        for entry in chunk:
            first_at.setdefault(entry.batch_id, entry.created_at)
        for batch_id in batch_ids:
            if batch_id not in groups:
                groups[batch_id] = self._new_group(uow, source_pk, batch_id, first_at[batch_id])
                created += 1
        calls = dict(
            session.execute(
                select(LegacyCall.legacy_id, LegacyCall.call_id).where(
                    LegacyCall.source_id == source_pk,
                    LegacyCall.legacy_id.in_([entry.legacy_id for entry in chunk]),
                )
            ).all()
        )
        present = set(
            session.execute(
                select(GroupMember.group_id, GroupMember.call_id).where(
                    GroupMember.group_id.in_(list(groups.values())),
                    GroupMember.call_id.in_(list(calls.values())),
                )
            ).all()
        )
        rows = []
        unmapped = 0
        for entry in chunk:
            call_id = calls.get(entry.legacy_id)
            if call_id is None:  # a row added to the source after the calls were copied
                unmapped += 1
                continue
            group_id = groups[entry.batch_id]
            if (group_id, call_id) in present:
                continue
            rows.append(
                {
                    "group_id": group_id,
                    "call_id": call_id,
                    "position": entry.position,
                    "role": GROUP_ROLE,
                    "created_at": entry.created_at,
                }
            )
        if rows:
            _insert_many(session, GroupMember.id, rows)
        return created, len(rows), unmapped

    def _new_group(
        self, uow: UnitOfWork, source_pk: int, batch_id: str, created_at: datetime
    ) -> int:
        base = batch_group_name(batch_id)
        name, n = base, 1
        while uow.groups.find(GROUP_TYPE, name) is not None:
            n += 1
            name = f"{base} ({n})"
        group = Group(
            group_type=GROUP_TYPE,
            name=name,
            description=f"v1 batch {batch_id!r}, imported from the legacy inference_runs table",
            metadata_json={LEGACY_KEY: {"source": self.source_name, "batch_id": batch_id}},
            created_at=created_at,
        )
        uow.session.add(group)
        uow.session.flush()
        uow.session.execute(
            insert(LegacyBatch).values(source_id=source_pk, batch_id=batch_id, group_id=group.id)
        )
        return group.id

    def _tell(self, phase: str, done: int, total: int, report: ImportReport) -> None:
        if self.progress is None:
            return
        if phase == "calls":
            self.progress(ImportProgress(phase, done, total, report.imported, report.skipped))
        else:
            self.progress(
                ImportProgress(phase, done, total, report.members_added, report.members_present)
            )


@dataclass(frozen=True, slots=True)
class _Entry:
    batch_id: str
    legacy_id: int
    position: int
    created_at: datetime


def _positioned(entries: Iterable[tuple[str, int, datetime]], size: int) -> Iterator[list[_Entry]]:
    """Number the rows of each batch from 0 in the order given; yield `size` at a time."""
    chunk: list[_Entry] = []
    current: str | None = None
    position = 0
    for batch_id, legacy_id, created_at in entries:
        if batch_id != current:
            current, position = batch_id, 0
        chunk.append(_Entry(batch_id, legacy_id, position, created_at))
        position += 1
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _insert_many(session: Session, key: InstrumentedAttribute[Any], rows: list[dict]) -> None:
    """INSERT `rows` into `key`'s table as multi-row statements.

    The RETURNING clause makes SQLAlchemy send a few multi-row INSERTs ("insertmanyvalues")
    instead of psycopg's pipelined executemany, which is slower and, when a row is
    refused, logs a second error line of its own.
    """
    session.execute(insert(key.class_).returning(key), rows).close()


def _was_sanitised(metadata_json: dict[str, Any]) -> bool:
    return bool((metadata_json.get(LEGACY_KEY) or {}).get("sanitised"))
