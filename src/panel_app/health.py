"""`GET /health`: JSON with the database's reachability and schema version (no secrets)."""

from __future__ import annotations

import asyncio
import json

from tornado.web import RequestHandler

from study_query_llm.db import migrate
from study_query_llm.db.urls import redact_url


def health_report(database_url: str) -> tuple[int, dict[str, object]]:
    """(HTTP status, body): 200 when the database answers at the newest schema, else 503."""
    body: dict[str, object] = {"status": "ok", "database": {"url": redact_url(database_url)}}
    try:
        current = migrate.current(database_url)
        head = migrate.head()
        body["database"] = {
            "url": redact_url(database_url),
            "reachable": True,
            "schema": current,
            "schema_head": head,
            "up_to_date": current == head,
        }
        if current != head:
            body["status"] = "degraded"
            return 503, body
    except Exception as exc:
        body["status"] = "unavailable"
        body["database"] = {
            "url": redact_url(database_url),
            "reachable": False,
            "error": type(exc).__name__,
        }
        return 503, body
    return 200, body


class HealthHandler(RequestHandler):
    """Tornado handler registered at /health by the launcher."""

    def initialize(self, database_url: str) -> None:
        self.database_url = database_url

    async def get(self) -> None:
        status, body = await asyncio.to_thread(health_report, self.database_url)
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))
