"""Serve the dashboard in a subprocess on a free local port, for tests and benchmarks.

`served_dashboard(workdir, env)` starts ``python -m panel_app`` with exactly the given
settings (nothing from the caller's provider keys or `.env` leaks in: the process runs in
`workdir`), waits until ``/health`` answers, and stops the process on exit. Its output
(the app's log) goes to a file the caller can read.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Settings a developer's shell may carry that must not reach the served app.
SETTING_PREFIXES = (
    "OPENAI_",
    "AZURE_OPENAI_",
    "HYPERBOLIC_",
    "OPENROUTER_",
    "ANTHROPIC_",
    "VLLM_",
    "LMSTUDIO_",
    "OLLAMA_",
    "MOCK_",
    "PRICING_OVERRIDES",
    "DATABASE_URL",
    "AUTH_",
    "PANEL_",
    "LOG_",
    "UPLOAD_",
    "PGPASSWORD",
    "PROVIDER_GROUPS",
    "CAPABILITY_OVERRIDES",
    "MODEL_LISTING_",
    "LEGACY_DATABASE_URL",
)


# Debian's Chromium, headless, with nothing reaching out to the network by itself: what the
# UI tests and the dashboard benchmark launch (Playwright's own browser download is not used).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any project setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.update(PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


@dataclass
class ServedDashboard:
    """A running dashboard: where it answers and what it logged."""

    url: str
    port: int
    log_path: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # 503 is an answer too: the server is up
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def served_dashboard(
    workdir: Path,
    settings: Mapping[str, str],
    *,
    args: Sequence[str] = (),
    startup_timeout_s: float = 120.0,
) -> Iterator[ServedDashboard]:
    """Run the dashboard with `settings` until the block ends; RuntimeError if it won't start."""
    port = free_port()
    log_path = workdir / f"dashboard-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "panel_app",
                "--port",
                str(port),
                "--address",
                "127.0.0.1",
                *args,
            ],
            cwd=workdir,
            env=clean_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    served = ServedDashboard(f"http://127.0.0.1:{port}", port, log_path, process)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _answers(served.url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"the dashboard exited with code {process.returncode}:\n{served.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the dashboard did not answer within {startup_timeout_s:.0f} s:\n"
                    f"{served.log_tail()}"
                )
            time.sleep(0.25)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
