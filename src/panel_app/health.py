"""`GET /health`: the database's reachability and schema version as JSON (no secrets).

With sign-in on, a visitor who is not signed in gets the status alone (``{"status":
"ok"}``, HTTP 200 or 503), enough for a container health check and nothing more.
``python -m panel_app.health`` asks the local server and exits 0 when it is healthy
(the Docker HEALTHCHECK).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request

from bokeh.server.views.auth_request_handler import AuthRequestHandler
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from study_query_llm.db import migrate


def backend_name(database_url: str) -> str:
    """``sqlite`` or ``postgresql``: all a page says about the database's address."""
    try:
        return make_url(database_url).get_backend_name()
    except ArgumentError:
        return "unknown"


def health_report(database_url: str) -> tuple[int, dict[str, object]]:
    """(HTTP status, body): 200 when the database answers at the newest schema, else 503."""
    backend = backend_name(database_url)
    body: dict[str, object] = {"status": "ok"}
    try:
        current = migrate.current(database_url)
        head = migrate.head()
    except Exception as exc:
        body["status"] = "unavailable"
        body["database"] = {"backend": backend, "reachable": False, "error": type(exc).__name__}
        return 503, body
    body["database"] = {
        "backend": backend,
        "reachable": True,
        "schema": current,
        "schema_head": head,
        "up_to_date": current == head,
    }
    if current != head:
        body["status"] = "degraded"
        return 503, body
    return 200, body


class HealthHandler(AuthRequestHandler):
    """Tornado handler registered at /health by the launcher."""

    def initialize(self, database_url: str, auth_enabled: bool = False) -> None:
        self.database_url = database_url
        self.auth_enabled = auth_enabled

    async def get(self) -> None:
        status, body = await asyncio.to_thread(health_report, self.database_url)
        if self.auth_enabled and not self.current_user:
            body = {"status": body["status"]}  # liveness only: details need a sign-in
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))


def check(port: int | None = None, timeout_s: float = 5.0) -> int:
    """Exit code for a container health check: 0 when the local /health answers 200."""
    port = port or int(os.environ.get("PANEL_PORT", "5006"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout_s) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"health check failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover - the Docker HEALTHCHECK
    sys.exit(check())
