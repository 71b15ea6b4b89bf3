"""Operations commands: `db backup PATH` (SQLite online backup), `db catch-up` (search
index and rollups after a bulk load) and `auth hash-password USER`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

from .config import Settings
from .db.backup import backup_sqlite
from .db.urls import redact_url
from .security import USERNAME_RE, PasswordHashError, hash_password

EXIT_OK = 0


def add_backup_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `db backup`."""
    parser.add_argument("path", help="backup file to write (or a directory: a dated file in it)")
    parser.add_argument("--force", action="store_true", help="replace the file if it exists")


async def run_backup(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the SQLite database while the app may be writing; print what was written."""
    result = await asyncio.to_thread(
        backup_sqlite, settings.database_url, args.path, overwrite=args.force
    )
    calls = "no raw_calls table" if result.calls is None else f"{result.calls:,} calls"
    print(
        f"backed up to {result.path} ({result.size_bytes / 1_048_576:.1f} MB, {calls}, "
        f"schema {result.schema or 'none'})"
    )
    return EXIT_OK


def run_catch_up(settings: Settings) -> int:
    """Index the search text a bulk load left to later, and rewrite any rollup cell whose
    sorted latencies are behind its counts (rows that arrived by plain INSERTs). Safe to
    run at any time and in several processes; prints what it did."""
    from .db import migrate, rollups, search_index
    from .db.connection import UnitOfWork, dispose_engine, get_engine

    url = settings.database_url
    migrate.upgrade(url)
    engine = get_engine(url)
    try:
        with UnitOfWork(engine) as uow:
            pending = search_index.pending(uow.session)
        indexed = search_index.catch_up(engine)
        repaired = rollups.repair(engine)
    finally:
        dispose_engine(url)
    print(
        f"database {redact_url(url)}: search text of {indexed:,} calls indexed "
        f"({pending:,} were waiting); {repaired:,} rollup cells brought up to date"
    )
    return EXIT_OK


def add_auth_parser(sub: argparse._SubParsersAction) -> None:
    """The `auth` command group."""
    auth = sub.add_parser("auth", help="dashboard sign-in").add_subparsers(
        dest="auth_command", required=True
    )
    hashed = auth.add_parser(
        "hash-password", help="print a user:hash entry for AUTH_USERS (asks for the password)"
    )
    hashed.add_argument("username", help="the user name to sign in with")
    hashed.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of asking",
    )


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat it: ") != first:
        raise PasswordHashError("the two passwords differ")
    return first


async def run_auth(args: argparse.Namespace, _settings: Settings) -> int:
    """`auth hash-password`: the AUTH_USERS entry on stdout, advice on stderr."""
    if not USERNAME_RE.match(args.username):
        raise PasswordHashError("the user name may use letters, digits and ._@+- (1-64 of them)")
    password = _read_password(args.password_stdin)
    if len(password) < 8:
        raise PasswordHashError("use a password of at least 8 characters")
    encoded = await asyncio.to_thread(hash_password, password)
    print(f"{args.username}:{encoded}")
    print("add it to AUTH_USERS in .env (separate several users with commas)", file=sys.stderr)
    return EXIT_OK
