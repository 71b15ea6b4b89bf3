"""Database URLs safe to show: the password is replaced, everything else kept."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


def redact_url(url: str) -> str:
    """`url` with any password masked (``postgresql://user:***@host/db``)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable database URL)"
