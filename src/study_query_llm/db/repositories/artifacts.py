"""`ArtifactRepository`: references to large or multimodal payloads of a call."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from study_query_llm.db.models_v2 import CallArtifact


class ArtifactRepository:
    """Adds and lists a call's artifacts (the blobs themselves live at `uri`)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        call_id: int,
        uri: str,
        *,
        content_type: str | None = None,
        byte_size: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        """Record an artifact of a call; returns its id."""
        artifact = CallArtifact(
            call_id=call_id,
            uri=uri,
            content_type=content_type,
            byte_size=byte_size,
            metadata_json=metadata,
        )
        self.session.add(artifact)
        self.session.flush()
        return artifact.id

    def get(self, artifact_id: int) -> CallArtifact | None:
        """The artifact with this id, or None."""
        return self.session.get(CallArtifact, artifact_id)

    def for_call(self, call_id: int) -> list[CallArtifact]:
        """The call's artifacts in the order they were added."""
        stmt = select(CallArtifact).where(CallArtifact.call_id == call_id).order_by(CallArtifact.id)
        return list(self.session.scalars(stmt))
