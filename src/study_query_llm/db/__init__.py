"""Storage: typed models, engines and units of work, repositories, search and migrations.

Import from the submodules (`study_query_llm.db.connection`, `.migrate`, `.filters`, ...);
this package module only re-exports the names most callers need.
"""

from study_query_llm.db.connection import UnitOfWork, get_engine, run_write
from study_query_llm.db.filters import CallFilters, RunFilters
from study_query_llm.db.models_v1 import InferenceRun
from study_query_llm.db.models_v2 import (
    CallArtifact,
    EmbeddingVector,
    Group,
    GroupMember,
    RawCall,
)
from study_query_llm.db.records import NewCall, NewRun

__all__ = [
    "CallArtifact",
    "CallFilters",
    "EmbeddingVector",
    "Group",
    "GroupMember",
    "InferenceRun",
    "NewCall",
    "NewRun",
    "RawCall",
    "RunFilters",
    "UnitOfWork",
    "get_engine",
    "run_write",
]
