"""Test and benchmark helpers: a loopback server that speaks LLM provider wire formats.

The names are imported lazily so that ``python -m study_query_llm.testing.server`` does not
import the server module twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from study_query_llm.testing.server import Fault, LoopbackServer, RecordedRequest

__all__ = ["Fault", "LoopbackServer", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from study_query_llm.testing import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
