"""`EmbeddingRepository`: embedding vectors returned by calls (append-only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from study_query_llm.db.models_v2 import EmbeddingVector, RawCall

_LOOKUP_CHUNK = 500  # request hashes per query (well under every bind-parameter limit)


class EmbeddingRepository:
    """Stores vectors with their dimension and L2 norm; looks them up by call and model."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self, call_id: int, model: str, vector: Sequence[float], *, input_index: int = 0
    ) -> int:
        """Store the vector for input `input_index` of the call; returns its id."""
        return self.add_many(call_id, model, [vector], first_index=input_index)[0]

    def add_many(
        self,
        call_id: int,
        model: str,
        vectors: Sequence[Sequence[float]],
        *,
        first_index: int = 0,
    ) -> list[int]:
        """Store one vector per input of a batched call (input_index 0, 1, ...)."""
        rows = [
            _row(call_id, model, vector, input_index)
            for input_index, vector in enumerate(vectors, start=first_index)
        ]
        self.session.add_all(rows)
        self.session.flush()
        return [row.id for row in rows]

    def get(self, vector_id: int) -> EmbeddingVector | None:
        """The vector row with this id, or None."""
        return self.session.get(EmbeddingVector, vector_id)

    def find(self, model: str, call_id: int, *, input_index: int = 0) -> EmbeddingVector | None:
        """The vector of this model for this call's input, or None."""
        stmt = select(EmbeddingVector).where(
            EmbeddingVector.model == model,
            EmbeddingVector.call_id == call_id,
            EmbeddingVector.input_index == input_index,
        )
        return self.session.scalars(stmt).first()

    def for_call(self, call_id: int, model: str | None = None) -> list[EmbeddingVector]:
        """The call's vectors (of one model, when given) by model then input index."""
        stmt = select(EmbeddingVector).where(EmbeddingVector.call_id == call_id)
        if model is not None:
            stmt = stmt.where(EmbeddingVector.model == model)
        stmt = stmt.order_by(EmbeddingVector.model, EmbeddingVector.input_index)
        return list(self.session.scalars(stmt))

    def for_request_hash(self, model: str, request_hash: str) -> list[EmbeddingVector]:
        """Vectors of the newest successful call of `model` with this request hash.

        This is the embedding cache lookup: an empty list means "not cached".
        """
        call_id = self.session.scalar(
            select(RawCall.id)
            .join(EmbeddingVector, EmbeddingVector.call_id == RawCall.id)
            .where(
                RawCall.request_hash == request_hash,
                RawCall.status == "success",
                EmbeddingVector.model == model,
            )
            .order_by(RawCall.created_at.desc(), RawCall.id.desc())
            .limit(1)
        )
        return [] if call_id is None else self.for_call(call_id, model)

    def cached(
        self, model: str, request_hashes: Sequence[str]
    ) -> dict[str, tuple[int, list[float]]]:
        """Embedding cache lookup for many single-input requests at once.

        Maps each request hash that has a successful call with a vector of `model` to
        ``(call_id, vector)`` of the newest such call (input 0). Missing hashes are
        simply absent from the result.
        """
        found: dict[str, tuple[int, list[float]]] = {}
        unique = list(dict.fromkeys(request_hashes))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            stmt = (
                select(RawCall.request_hash, RawCall.id, EmbeddingVector.vector)
                .join(EmbeddingVector, EmbeddingVector.call_id == RawCall.id)
                .where(
                    RawCall.request_hash.in_(unique[start : start + _LOOKUP_CHUNK]),
                    RawCall.status == "success",
                    EmbeddingVector.model == model,
                    EmbeddingVector.input_index == 0,
                )
                .order_by(RawCall.created_at, RawCall.id)  # the newest is written last
            )
            for request_hash, call_id, vector in self.session.execute(stmt):
                found[request_hash] = (call_id, vector)
        return found

    def for_model(self, model: str, call_ids: Sequence[int] | None = None) -> list[EmbeddingVector]:
        """Every vector of a model (optionally only for these calls), by call and input."""
        stmt = select(EmbeddingVector).where(EmbeddingVector.model == model)
        if call_ids is not None:
            stmt = stmt.where(EmbeddingVector.call_id.in_(call_ids))
        stmt = stmt.order_by(EmbeddingVector.call_id, EmbeddingVector.input_index)
        return list(self.session.scalars(stmt))


def _row(call_id: int, model: str, vector: Sequence[float], input_index: int) -> EmbeddingVector:
    values = [float(x) for x in vector]
    if not values:
        raise ValueError("an embedding vector needs at least one value")
    if not all(math.isfinite(x) for x in values):
        raise ValueError("an embedding vector must not contain NaN or infinity")
    return EmbeddingVector(
        call_id=call_id,
        model=model,
        input_index=input_index,
        dimension=len(values),
        norm=math.sqrt(math.fsum(x * x for x in values)),
        vector=values,
    )
