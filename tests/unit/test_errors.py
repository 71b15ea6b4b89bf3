"""HTTP statuses map onto one hierarchy: transient (retry) versus permanent (do not)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from study_query_llm.providers.errors import (
    AuthenticationError,
    BadRequestError,
    ModelNotFoundError,
    PermanentProviderError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    RateLimitError,
    TransientProviderError,
    error_for_status,
    parse_retry_after,
)


@pytest.mark.parametrize(
    ("status", "cls", "transient"),
    [
        (429, RateLimitError, True),
        (500, ProviderUnavailableError, True),
        (502, ProviderUnavailableError, True),
        (503, ProviderUnavailableError, True),
        (529, ProviderUnavailableError, True),
        (408, ProviderTimeoutError, True),
        (400, BadRequestError, False),
        (422, BadRequestError, False),
        (401, AuthenticationError, False),
        (403, AuthenticationError, False),
        (404, ModelNotFoundError, False),
        (418, PermanentProviderError, False),
    ],
)
def test_status_mapping(status, cls, transient):
    error = error_for_status(status, "boom", provider="openai", model="m")
    assert type(error) is cls
    assert error.transient is transient
    assert isinstance(error, TransientProviderError if transient else PermanentProviderError)
    assert error.to_json()["status_code"] == status


def test_auth_error_names_the_variable_to_fix():
    error = error_for_status(
        401, "Incorrect API key", provider="openai", model="m", key_env_var="OPENAI_API_KEY"
    )
    assert error.env_var == "OPENAI_API_KEY"
    assert "OPENAI_API_KEY" in str(error)
    assert error.to_json()["env_var"] == "OPENAI_API_KEY"


def test_rate_limit_exposes_retry_after_seconds():
    error = error_for_status(
        429, "slow down", provider="p", model="m", headers={"retry-after": "7"}
    )
    assert isinstance(error, RateLimitError)
    assert error.retry_after == 7.0
    assert error.to_json()["retry_after"] == 7.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "soon"}, None),
    ],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date():
    when = datetime.now(UTC) + timedelta(seconds=30)
    seconds = parse_retry_after({"retry-after": format_datetime(when, usegmt=True)})
    assert seconds is not None
    assert 25 <= seconds <= 31
