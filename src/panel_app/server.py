"""Serve the dashboard: `python -m panel_app` (or `make run`) on port 5006 with /health.

Every setting comes from the environment or `.env` (PANEL_ADDRESS, PANEL_PORT,
PANEL_ALLOW_WEBSOCKET_ORIGIN, PANEL_NUM_PROCS, sign-in, upload limits, logging); the
command-line options override the first four. The database is migrated once, before the
server starts (and before it forks into several processes).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import weakref
from typing import Any, NoReturn

import panel as pn
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from study_query_llm.config import Settings
from study_query_llm.db import migrate
from study_query_llm.db.connection import dispose_all_engines
from study_query_llm.logging_setup import add_context_provider, configure_logging, redact

from .app import create_app
from .auth import LOGOUT_PATH, AuthSettingsError, AuthSetup, auth_setup
from .health import HealthHandler
from .safe import escape
from .web import SecurityHeaders, log_request

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_HTTP_BODY_BYTES = 1024 * 1024  # only the sign-in form is ever posted
WEBSOCKET_OVERHEAD_BYTES = 1024 * 1024  # message framing around an uploaded file
OVERSIZE_SEEN = 2  # uploads up to this many times UPLOAD_MAX_BYTES get a clear refusal

# Log context of each open page (session id and user), read on every log line.
_sessions: weakref.WeakKeyDictionary[Any, dict[str, str | None]] = weakref.WeakKeyDictionary()


def _session_fields() -> dict[str, str | None]:
    doc = pn.state.curdoc
    return _sessions.get(doc, {}) if doc is not None else {}


def websocket_limit(settings: Settings) -> int:
    """Largest websocket message the server reads: an upload of twice UPLOAD_MAX_BYTES.

    An upload arrives base64-encoded in one message. Up to twice the limit it reaches the
    batch view, which refuses it with a message naming the limit; anything larger is cut
    off by the server before it is read into memory (the page reports the lost connection).
    """
    return math.ceil(OVERSIZE_SEEN * settings.upload_max_bytes * 4 / 3) + WEBSOCKET_OVERHEAD_BYTES


def _signed_in_bar(user: str | None) -> pn.pane.HTML:
    return pn.pane.HTML(
        f'<span style="color:#fff">{escape(user or "signed in")} · '
        f'<a href=".{LOGOUT_PATH}" style="color:#fff">Sign out</a></span>',
        css_classes=["sqllm-signed-in"],
        align="center",
    )


def page_factory(settings: Settings, auth: AuthSetup):
    """The per-session page builder: the dashboard plus session logging and sign-out."""

    def page():
        template = create_app(settings)
        doc = pn.state.curdoc
        user = pn.state.user if auth.enabled else None
        context = doc.session_context if doc is not None else None
        fields = {"session": context.id[:12] if context is not None else None, "user": user}
        if doc is not None:
            _sessions[doc] = fields
        log.info("session opened", extra={"event": "session_open", **fields})

        def closed(_context) -> None:
            log.info("session closed", extra={"event": "session_close", **fields})

        if doc is not None:
            pn.state.on_session_destroyed(closed)
        if auth.enabled:
            template.header.append(_signed_in_bar(user))
        return template

    return page


def _fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and exit: 2 for settings, 1 for the database."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        _fail(f"invalid settings: {problems}")


def main(argv: list[str] | None = None) -> None:
    # Serve every JS/CSS resource from this server, never from a CDN (offline labs).
    os.environ.setdefault("BOKEH_RESOURCES", "server")
    settings = _load_settings()
    parser = argparse.ArgumentParser(prog="python -m panel_app", description=__doc__)
    parser.add_argument("--port", type=int, default=settings.panel_port, help="PANEL_PORT")
    parser.add_argument("--address", default=settings.panel_address, help="PANEL_ADDRESS")
    parser.add_argument(
        "--allow-websocket-origin",
        action="append",
        default=[],
        help="host[:port] to allow (repeat; PANEL_ALLOW_WEBSOCKET_ORIGIN)",
    )
    parser.add_argument(
        "--num-procs", type=int, default=settings.panel_num_procs, help="PANEL_NUM_PROCS"
    )
    parser.add_argument("--show", action="store_true", help="open a browser")
    args = parser.parse_args(argv)

    try:
        configure_logging(settings)
        auth = auth_setup(settings)
    except (ValueError, AuthSettingsError) as exc:
        _fail(str(exc))
    add_context_provider(_session_fields)
    pn.extension("tabulator", notifications=True)
    try:
        migrate.upgrade(settings.database_url)  # once, before any session or fork
    except (SQLAlchemyError, OSError) as exc:
        text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        _fail(f"database problem: {redact(text[0] if text else type(exc).__name__)}", 1)
    dispose_all_engines()  # no pooled connection may cross into forked server processes

    origins = args.allow_websocket_origin or settings.websocket_origins(args.port)
    if not auth.enabled and args.address not in LOOPBACK:
        log.warning(
            "serving on %s without sign-in: anyone who can reach this port can use the "
            "dashboard and its provider keys; set AUTH_USERS or PANEL_OAUTH_PROVIDER",
            args.address,
        )
    if auth.cookie_secret_generated:
        log.warning("PANEL_COOKIE_SECRET is not set: sign-ins end when the server restarts")
    log.info(
        "starting the dashboard",
        extra={
            "event": "server_start",
            "address": args.address,
            "port": args.port,
            "num_procs": args.num_procs,
            "auth": auth.mode,
            "websocket_origins": origins,
        },
    )
    pn.serve(
        {"/": page_factory(settings, auth)},
        port=args.port,
        address=args.address,
        websocket_origin=origins,
        show=args.show,
        num_procs=args.num_procs,
        title="Study Query LLM",
        extra_patterns=[
            (
                r"/health",
                HealthHandler,
                {"database_url": settings.database_url, "auth_enabled": auth.enabled},
            )
        ],
        websocket_max_message_size=websocket_limit(settings),
        http_server_kwargs={"max_body_size": MAX_HTTP_BODY_BYTES},
        use_xheaders=settings.panel_use_xheaders,
        transforms=[SecurityHeaders],
        log_function=log_request,
        **auth.serve_kwargs,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
