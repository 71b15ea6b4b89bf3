"""Plain input records for inserts: what a caller knows about a call before it has an id."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from datetime import datetime
from typing import Any, Self

from study_query_llm.db.column_types import as_utc, utcnow
from study_query_llm.db.models_v2 import MODALITIES, STATUSES


def _values(record: object) -> dict[str, Any]:
    """The fields of a record as a dict (shallow: JSON values are not copied; bulk inserts
    only serialise them)."""
    names = _FIELD_NAMES.get(type(record))
    if names is None:
        names = _FIELD_NAMES[type(record)] = tuple(f.name for f in fields(record))  # type: ignore[arg-type]
    return {name: getattr(record, name) for name in names}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


@dataclass(frozen=True, kw_only=True)
class NewCall:
    """One provider call to record in `raw_calls`.

    `request_json` holds the request (``{"messages": [...], "options": {...}}`` or
    ``{"prompt": "..."}``, ``{"input": ...}`` for embeddings) and `response_json` the
    response with its text under ``"text"``; search indexes both. `created_at` defaults
    to now (UTC).
    """

    provider: str
    model: str
    request_json: dict[str, Any]
    status: str = "success"
    modality: str = "chat"
    response_json: dict[str, Any] | None = None
    error_json: dict[str, Any] | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None
    request_hash: str | None = None
    metadata_json: dict[str, Any] | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        _check_call(self.status, self.modality, self.request_json)

    @classmethod
    def coerce(cls, value: NewCall | Mapping[str, Any]) -> Self:
        """Accept a `NewCall` or a dict of its fields (unknown keys are an error)."""
        if isinstance(value, cls):
            return value
        return cls(**value)

    @classmethod
    def row_of(cls, value: NewCall | Mapping[str, Any]) -> dict[str, Any]:
        """`coerce(value).row()`; a dict is checked the same way but goes straight to its row
        (building a frozen record per call is a tenth of a bulk insert's time)."""
        if isinstance(value, cls):
            return value.row()
        defaults = _CALL_DEFAULTS
        if not isinstance(value, Mapping) or not (
            _CALL_REQUIRED <= value.keys() <= defaults.keys()
        ):
            return cls.coerce(value).row()  # the dataclass names what is missing or unknown
        row = {**defaults, **value}
        _check_call(row["status"], row["modality"], row["request_json"])
        created = row["created_at"]
        row["created_at"] = as_utc(created) if created else utcnow()
        return row

    def row(self) -> dict[str, Any]:
        """Column values for the insert, with `created_at` filled in."""
        values = _values(self)
        values["created_at"] = as_utc(self.created_at) if self.created_at else utcnow()
        return values


def _check_call(status: str, modality: str, request_json: object) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if not isinstance(request_json, Mapping):
        raise TypeError("request_json must be a JSON object (a dict)")


_CALL_DEFAULTS: dict[str, Any] = {
    f.name: None if f.default is MISSING else f.default for f in fields(NewCall)
}
_CALL_REQUIRED = frozenset(f.name for f in fields(NewCall) if f.default is MISSING)


@dataclass(frozen=True, kw_only=True)
class NewRun:
    """One v1 `inference_runs` row to record."""

    prompt: str
    provider: str
    response: str | None = None
    model: str | None = None
    tokens: int | None = None
    latency_ms: float | None = None
    metadata_json: dict[str, Any] | None = None
    batch_id: str | None = None
    created_at: datetime | None = None

    @classmethod
    def coerce(cls, value: NewRun | Mapping[str, Any]) -> Self:
        """Accept a `NewRun` or a dict of its fields (``metadata`` is accepted too)."""
        if isinstance(value, cls):
            return value
        fields = dict(value)
        if "metadata" in fields:
            fields["metadata_json"] = fields.pop("metadata")
        return cls(**fields)

    def row(self) -> dict[str, Any]:
        """Column values for the insert, with `created_at` filled in."""
        values = _values(self)
        values["created_at"] = as_utc(self.created_at) if self.created_at else utcnow()
        return values
