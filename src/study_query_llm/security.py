"""Password hashes for dashboard sign-in: PBKDF2-SHA256 in a format that fits `.env` files.

A hash looks like ``pbkdf2_sha256:600000:<salt>:<digest>`` (salt and digest in URL-safe
base64 without padding). It has no ``$``, quotes, commas or spaces, so it needs no quoting
or escaping in `.env`, docker compose or a shell. `AUTH_USERS` lists ``user:hash`` pairs
separated by commas (or new lines); make a pair with ``study-query-llm auth hash-password``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from functools import lru_cache

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000  # OWASP's figure for PBKDF2-HMAC-SHA256
SALT_BYTES = 16
USERNAME_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,64}$")


class PasswordHashError(ValueError):
    """A stored hash or an AUTH_USERS entry is malformed; the message says which."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A new salted hash of `password`."""
    if not password:
        raise PasswordHashError("the password is empty")
    if iterations < 1:
        raise PasswordHashError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{ALGORITHM}:{iterations}:{_b64(salt)}:{_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes]:
    parts = encoded.strip().split(":")
    if len(parts) != 4 or parts[0] != ALGORITHM:
        raise PasswordHashError(f"not a {ALGORITHM}:<iterations>:<salt>:<digest> hash")
    try:
        iterations = int(parts[1])
        salt, digest = _unb64(parts[2]), _unb64(parts[3])
    except (ValueError, binascii.Error):
        raise PasswordHashError("the hash has a bad iteration count, salt or digest") from None
    if iterations < 1 or not salt or not digest:
        raise PasswordHashError("the hash has a bad iteration count, salt or digest")
    return iterations, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches the stored hash (constant-time comparison)."""
    iterations, salt, digest = _parse_hash(encoded)
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(candidate, digest)


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def check_login(users: dict[str, str], username: str, password: str) -> bool:
    """Whether the user exists and the password is right.

    An unknown user costs as much time as a known one, so timing does not tell which
    user names exist.
    """
    encoded = users.get(username)
    if encoded is None:
        verify_password(password, _dummy_hash())
        return False
    return verify_password(password, encoded)


def parse_users(value: str) -> dict[str, str]:
    """`AUTH_USERS` (``alice:pbkdf2_sha256:...,bob:...``) as {user: hash}; checks every entry."""
    users: dict[str, str] = {}
    entries = [e.strip() for e in re.split(r"[,\s]+", value) if e.strip()]
    for number, entry in enumerate(entries, start=1):
        username, sep, encoded = entry.partition(":")
        if not sep or not USERNAME_RE.match(username):
            raise PasswordHashError(
                f"AUTH_USERS entry {number} must be user:hash with a user name of letters, "
                "digits and ._@+- (make one with: study-query-llm auth hash-password USER)"
            )
        try:
            _parse_hash(encoded)
        except PasswordHashError as exc:
            raise PasswordHashError(f"AUTH_USERS entry {number} ({username}): {exc}") from None
        if username in users:
            raise PasswordHashError(f"AUTH_USERS lists {username} twice")
        users[username] = encoded
    return users
