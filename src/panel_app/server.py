"""Serve the dashboard: `python -m panel_app` (or `make run`) on port 5006 with /health."""

from __future__ import annotations

import argparse
import logging
import os

import panel as pn

from study_query_llm.config import get_settings
from study_query_llm.db import migrate

from .app import create_app
from .health import HealthHandler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m panel_app", description=__doc__)
    parser.add_argument("--port", type=int, default=5006)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument(
        "--allow-websocket-origin", action="append", default=[], help="host[:port] to allow"
    )
    parser.add_argument("--num-procs", type=int, default=1)
    parser.add_argument("--show", action="store_true", help="open a browser")
    args = parser.parse_args(argv)

    # Serve every JS/CSS resource from this server, never from a CDN (offline labs).
    os.environ.setdefault("BOKEH_RESOURCES", "server")
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s %(message)s"
    )
    pn.extension("tabulator", notifications=True)
    migrate.upgrade(settings.database_url)  # once per process, before any session
    origins = args.allow_websocket_origin or [f"localhost:{args.port}", f"127.0.0.1:{args.port}"]
    pn.serve(
        {"/": create_app},
        port=args.port,
        address=args.address,
        websocket_origin=origins,
        show=args.show,
        num_procs=args.num_procs,
        title="Study Query LLM",
        extra_patterns=[(r"/health", HealthHandler, {"database_url": settings.database_url})],
    )


if __name__ == "__main__":  # pragma: no cover
    main()
