"""Shared fixtures: clean settings (no developer .env leaks in) and the loopback provider server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from study_query_llm.config import Settings
from study_query_llm.testing.dashboard import SETTING_PREFIXES

# Keys, endpoints and app settings must never come from the developer's shell or .env.
_PROVIDER_ENV_PREFIXES = SETTING_PREFIXES


@pytest.fixture(autouse=True)
def _isolated_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_PROVIDER_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings with nothing configured but a throwaway SQLite file; `.env` is not read."""
    return Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'test.db'}")


@pytest.fixture(scope="session")
def _loopback_session() -> Iterator[object]:
    from study_query_llm.testing.server import LoopbackServer

    with LoopbackServer() as server:
        yield server


@pytest.fixture
def loopback(_loopback_session):
    """The loopback provider server, reset (no faults, no delay, no requests) for each test."""
    _loopback_session.reset()
    _loopback_session.delay_s = 0.0
    yield _loopback_session
    _loopback_session.reset()
