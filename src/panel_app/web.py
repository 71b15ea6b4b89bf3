"""HTTP hardening for the dashboard's Tornado server: security headers, request ids, access log.

`SecurityHeaders` is a Tornado output transform, so it applies to every response the
server sends (pages, static files, /health, sign-in pages): a Content-Security-Policy that
Panel's pages work under (Bokeh needs inline scripts and styles, compiles callbacks at run
time and loads modules from blob: URLs), no framing, no MIME sniffing, a same-origin
referrer, and an ``X-Request-ID`` that is also on every log line written while the request
(or its websocket) is handled.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.web import OutputTransform, RequestHandler

from study_query_llm.logging_setup import bind_request_id

access_log = logging.getLogger("panel_app.access")

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
HSTS = "max-age=31536000"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


class SecurityHeaders(OutputTransform):
    """Adds the security headers and the request id to every response."""

    def __init__(self, request: HTTPServerRequest) -> None:
        super().__init__(request)
        incoming = request.headers.get("X-Request-ID", "")
        # Reuse a proxy's id when it looks like one; never copy arbitrary text into logs.
        self.request_id = bind_request_id(incoming if _REQUEST_ID.match(incoming) else None)
        request.sqllm_request_id = self.request_id  # type: ignore[attr-defined]
        self.https = request.protocol == "https"

    def transform_first_chunk(
        self, status_code: int, headers: HTTPHeaders, chunk: bytes, finishing: bool
    ) -> tuple[int, HTTPHeaders, bytes]:
        for name, value in SECURITY_HEADERS.items():
            if name not in headers:
                headers[name] = value
        if self.https and "Strict-Transport-Security" not in headers:
            headers["Strict-Transport-Security"] = HSTS
        headers["X-Request-ID"] = self.request_id
        return status_code, headers, chunk


def log_request(handler: RequestHandler) -> None:
    """Tornado's `log_function`: one line per request, path without its query string.

    Query strings can carry OAuth codes and sign-in messages, so they are left out.
    Static files that load fine are logged at DEBUG only.
    """
    request = handler.request
    status = handler.get_status()
    user: Any = getattr(handler, "_current_user", None)  # only if already worked out
    if status >= 500:
        level = logging.ERROR
    elif status >= 400:
        level = logging.WARNING
    elif request.path.startswith("/static/"):
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not access_log.isEnabledFor(level):
        return
    access_log.log(
        level,
        "%s %s %s",
        request.method,
        request.path,
        status,
        extra={
            "event": "http_request",
            "request_id": getattr(request, "sqllm_request_id", None),
            "method": request.method,
            "path": request.path,
            "status_code": status,
            "duration_ms": round(1000.0 * request.request_time(), 1),
            "remote_ip": request.remote_ip,
            "user": user if isinstance(user, str) and user != "default_user" else None,
        },
    )
