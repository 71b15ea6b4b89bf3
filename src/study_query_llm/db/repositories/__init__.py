"""Repositories: each takes a Session and reads or writes one part of the schema."""

from study_query_llm.db.repositories.artifacts import ArtifactRepository
from study_query_llm.db.repositories.embeddings import EmbeddingRepository
from study_query_llm.db.repositories.groups import GroupRepository
from study_query_llm.db.repositories.inference import InferenceRepository
from study_query_llm.db.repositories.raw_calls import RawCallRepository

__all__ = [
    "ArtifactRepository",
    "EmbeddingRepository",
    "GroupRepository",
    "InferenceRepository",
    "RawCallRepository",
]
