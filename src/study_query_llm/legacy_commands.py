"""Command-line front ends of the v1 import and its check (the two scripts, `db import-v1`).

Both read the legacy database from ``--source`` or LEGACY_DATABASE_URL and the v2 database
from ``--target`` or DATABASE_URL (environment or `.env`). Failures are one line on stderr:
exit code 2 for a bad argument or an unusable source, 1 for a database failure or (for
the check) any mismatch, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from study_query_llm.config import Settings
from study_query_llm.db import migrate
from study_query_llm.db.connection import dispose_engine, get_engine
from study_query_llm.db.legacy import LegacyDatabase, database_identity
from study_query_llm.db.urls import redact_url
from study_query_llm.services.legacy_import import (
    DEFAULT_CHUNK_SIZE,
    ImportProgress,
    ImportReport,
    LegacyImporter,
    LegacyImportError,
)
from study_query_llm.services.legacy_validate import BackfillValidator

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
IMPORT_INTERRUPTED = (
    "interrupted: everything imported so far is kept; run the same command again to finish"
)


class LegacySettings(Settings):
    """The project's settings plus the legacy database's URL."""

    legacy_database_url: str | None = None


class _Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Failure(f"{self.prog}: {message}", EXIT_USAGE)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", help="URL of the legacy database (default: LEGACY_DATABASE_URL)"
    )
    parser.add_argument("--target", help="URL of the v2 database (default: DATABASE_URL)")
    parser.add_argument(
        "--source-name",
        help="the name the import record knows the source by (default: its file path, or "
        "host:port/database); give the same name if the legacy file has moved",
    )


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the import command."""
    _add_common(parser)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"rows per transaction (default: {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the check command."""
    _add_common(parser)
    parser.add_argument(
        "--sample", type=int, default=200, help="rows to compare field by field (default: 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    parser.add_argument("--full", action="store_true", help="compare every row instead of a sample")


def _urls(args: argparse.Namespace) -> tuple[str, str]:
    if args.source and args.target:
        return args.source, args.target
    try:
        settings = LegacySettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise _Failure(f"invalid settings: {problems}", EXIT_USAGE) from None
    source = args.source or settings.legacy_database_url
    if not source:
        raise _Failure(
            "no legacy database given: pass --source URL or set LEGACY_DATABASE_URL", EXIT_USAGE
        )
    return source, args.target or settings.database_url


def _progress_bars(enabled: bool) -> tuple[Callable[[ImportProgress], None] | None, Callable]:
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(progress: ImportProgress) -> None:
        bar = bars.get(progress.phase)
        if bar is None:
            for other in bars.values():
                other.close()
            unit = "row" if progress.phase == "calls" else "member"
            bar = bars[progress.phase] = tqdm(
                total=progress.total,
                desc="v1 rows" if progress.phase == "calls" else "batch groups",
                unit=unit,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        bar.total = progress.total
        bar.n = progress.done
        bar.set_postfix(new=progress.imported, present=progress.skipped, refresh=False)
        bar.refresh()

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def _print_import(report: ImportReport, source_url: str, target_url: str) -> None:
    print(f"v1 -> v2 import: {source_url} -> {target_url}")
    print(f"  source:   {report.source}")
    print(
        f"  rows:     {report.source_rows:,} in inference_runs: {report.imported:,} imported now,"
        f" {report.skipped:,} already imported"
    )
    if report.batched_rows:
        print(
            f"  batches:  {report.batches:,} ({report.batched_rows:,} rows): "
            f"{report.groups_created:,} groups made, {report.members_added:,} members added, "
            f"{report.members_present:,} already there"
        )
    else:
        print("  batches:  none (no row has a batch_id)")
    if report.unmapped_members:
        print(
            f"  note:     {report.unmapped_members:,} batched rows were added to the source "
            "during the import; run it again to bring them over"
        )
    if report.sanitised:
        rows = "row holds" if report.sanitised == 1 else "rows hold"
        print(
            f"  note:     {report.sanitised:,} {rows} NUL characters, stored as U+FFFD "
            "(marked legacy.sanitised)"
        )
    for warning in report.warnings:
        print(f"  warning:  {warning}")
    print(f"  time:     {report.seconds:.1f} s ({report.rows_per_second:,.0f} rows/s)")
    print("check it with scripts/validate_backfill.py (same --source/--target)")


def run_import(args: argparse.Namespace) -> int:
    """Run the import described by parsed `args`; print a summary; return the exit code."""
    source_url, target_url = _urls(args)
    if args.chunk_size < 1:
        raise _Failure("--chunk-size must be at least 1", EXIT_USAGE)
    with LegacyDatabase(source_url) as legacy:
        if legacy.identity == database_identity(target_url):
            raise LegacyImportError(
                f"the legacy database is the target database ({legacy.shown}); point "
                "--source at the old v1 database"
            )
        migrate.upgrade(target_url)  # like every command: the newest schema first
        update, close = _progress_bars(not args.no_progress)
        importer = LegacyImporter(
            legacy,
            get_engine(target_url),
            source_name=args.source_name,
            chunk_size=args.chunk_size,
            progress=update,
        )
        try:
            report = importer.run()
        finally:
            close()
            dispose_engine(target_url)
    _print_import(report, legacy.shown, redact_url(target_url))
    return EXIT_OK


def run_validate(args: argparse.Namespace) -> int:
    """Run the check described by parsed `args`; print the report; 0 only if all agree."""
    source_url, target_url = _urls(args)
    if args.sample < 0:
        raise _Failure("--sample must not be negative", EXIT_USAGE)
    with LegacyDatabase(source_url) as legacy:
        target = make_url(target_url)
        if target.get_backend_name() == "sqlite" and not Path(target.database or "").is_file():
            # The check only reads: never let connecting create an empty target file.
            raise _Failure(f"target database not found: {redact_url(target_url)}", EXIT_USAGE)
        try:
            report = BackfillValidator(
                legacy,
                get_engine(target_url),
                source_name=args.source_name,
                sample=args.sample,
                seed=args.seed,
                full=args.full,
            ).run()
        finally:
            dispose_engine(target_url)
    print(report.render())
    return EXIT_OK if report.ok else EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def run_guarded(
    command: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    interrupted: str = "interrupted",
) -> int:
    """Run `command`, turning every expected failure into one line on stderr."""
    try:
        return command(args)
    except _Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (ValueError, LegacyImportError) as exc:  # LegacySourceError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SQLAlchemyError, OSError) as exc:
        print(f"error: database problem: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    add: Callable[[argparse.ArgumentParser], None],
    command: Callable[[argparse.Namespace], int],
    interrupted: str = "interrupted",
) -> int:
    parser = _Parser(prog=prog, description=description)
    add(parser)
    try:
        args = parser.parse_args(argv)
    except _Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return run_guarded(command, args, interrupted)


def import_main(argv: Sequence[str] | None = None) -> int:
    """`scripts/migrate_v1_to_v2.py`."""
    return _main(
        argv,
        "migrate_v1_to_v2.py",
        "Copy a legacy v1 inference_runs table into v2 raw_calls and batch groups; "
        "safe to run again.",
        add_import_arguments,
        run_import,
        IMPORT_INTERRUPTED,
    )


def validate_main(argv: Sequence[str] | None = None) -> int:
    """`scripts/validate_backfill.py`."""
    return _main(
        argv,
        "validate_backfill.py",
        "Compare a legacy v1 database with the v2 rows imported from it; exit 1 on any mismatch.",
        add_validate_arguments,
        run_validate,
    )
