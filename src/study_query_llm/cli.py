"""The `study-query-llm` command line: providers, ask, and (as they arrive) db and batch commands.

Every failure is one clear line on stderr and a non-zero exit: 2 for bad arguments or
configuration, 1 for a provider or runtime failure. No tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .db import migrate
from .db.urls import redact_url
from .providers import (
    SPECS,
    ProviderConfigurationError,
    ProviderError,
    ProviderResponse,
    configured,
    create,
)
from .providers.pricing import PricingTable
from .providers.registry import get_spec
from .services.context import open_services
from .services.jobs import Target
from .services.prompt_files import PromptFileError, read_prompts
from .services.recorder import RecordingError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report as one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{self.prog}: {message}", EXIT_USAGE)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="study-query-llm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    providers = sub.add_parser("providers", help="configured providers and their models")
    providers.add_argument(
        "--no-models", action="store_true", help="do not ask each provider for its model list"
    )
    providers.add_argument("--json", action="store_true", help="print JSON")
    check = providers.add_subparsers(dest="providers_command", parser_class=_Parser).add_parser(
        "check", help="per target: reachable, tiny-request latency, breaker, recent failures"
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    check.add_argument(
        "--provider", "-p", action="append", default=[], help="only this provider or group:NAME"
    )
    check.add_argument(
        "--no-request", action="store_true", help="only list models: no tokens, nothing recorded"
    )
    check.add_argument("--window-minutes", type=float, default=60.0, help="recent failure window")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds per check")

    ask = sub.add_parser("ask", help="send one prompt and print the answer and its metadata")
    ask.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    ask.add_argument("--provider", "-p", default="mock", help="provider id (default: mock)")
    ask.add_argument("--model", "-m", help="model (default: the provider's configured model)")
    ask.add_argument("--system", help="system prompt")
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--json-mode", action="store_true", help="ask for a JSON object answer")
    ask.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    ask.add_argument("--json", action="store_true", help="print the full response as JSON")
    ask.add_argument(
        "--no-record", action="store_true", help="call the provider without recording the call"
    )

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, parser_class=_Parser
    )
    db.add_parser("upgrade", help="bring the database to the newest schema (keeps all data)")
    db.add_parser("current", help="print the schema revision of the database")
    from .ops_commands import add_auth_parser, add_backup_arguments

    add_backup_arguments(db.add_parser("backup", help="copy the SQLite database, even in use"))
    db.add_parser(
        "catch-up",
        help="index search text a bulk load deferred; bring rollup latencies up to date",
    )
    add_auth_parser(sub)
    from .legacy_commands import add_import_arguments

    add_import_arguments(
        db.add_parser("import-v1", help="copy a legacy v1 database into v2 (safe to rerun)")
    )

    batch = sub.add_parser("batch", help="run, inspect and resume batches").add_subparsers(
        dest="batch_command", required=True, parser_class=_Parser
    )
    run = batch.add_parser("run", help="send every prompt of a file to one or more models")
    run.add_argument("--prompts", required=True, help="a .txt, .csv or .jsonl file of prompts")
    run.add_argument("--provider", "-p", default="mock", help="provider for every --model")
    run.add_argument(
        "--model", "-m", action="append", default=[], help="model (repeat for several)"
    )
    run.add_argument(
        "--target", action="append", default=[], help="provider:model (repeat for several)"
    )
    run.add_argument("--samples", "-n", type=int, default=1, help="answers per prompt and model")
    run.add_argument("--concurrency", "-c", type=int, default=8, help="calls in flight at once")
    run.add_argument("--group", help="name of the batch group (default: a timestamp)")
    run.add_argument("--temperature", type=float)
    run.add_argument("--max-tokens", type=int)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--lease-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    status = batch.add_parser("status", help="counts of a batch by state")
    status.add_argument("job_id", type=int)
    resume = batch.add_parser("resume", help="finish an interrupted or cancelled batch")
    resume.add_argument("job_id", type=int)
    resume.add_argument("--concurrency", "-c", type=int, default=8)
    resume.add_argument("--no-progress", action="store_true")
    resume.add_argument("--lease-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    batch.add_parser("list", help="recent batches")
    return parser


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise CliError(f"invalid settings: {problems}", EXIT_USAGE) from None


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fmt(value: Any, suffix: str = "") -> str:
    return "—" if value is None else f"{value}{suffix}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


async def _providers_check(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import timedelta

    from .providers.health import check_health

    if not (args.window_minutes > 0 and args.timeout > 0):
        raise CliError("--window-minutes and --timeout must be more than 0", EXIT_USAGE)
    for provider_id in args.provider:
        get_spec(provider_id, settings)  # unknown or unconfigured: fail before the database
    async with open_services(settings) as services:
        rows = await check_health(
            services,
            provider_ids=args.provider or None,
            request=not args.no_request,
            window=timedelta(minutes=args.window_minutes),
            timeout_s=args.timeout,
        )
    if args.json:
        payload = {"window_minutes": args.window_minutes, "targets": [r.to_json() for r in rows]}
        print(json.dumps(payload, indent=2))
    else:
        print(f"{'target':<44} {'reachable':<9} {'listing':>8} {'request':>8}  {'breaker':<12} "
              f"failures ({args.window_minutes:g} min)")  # fmt: skip
        for row in rows:
            breaker = (row.breaker or {}).get("state") or (row.breaker or {}).get("strategy", "—")
            rate = (
                "—"
                if row.failure_rate is None
                else f"{row.recent_failures}/{row.recent_calls} ({row.failure_rate:.1%})"
            )
            reachable = {True: "yes", False: "NO", None: "—"}[row.reachable]
            print(f"{row.label[:44]:<44} {reachable:<9} {_ms(row.listing_ms):>8} "
                  f"{_ms(row.request_ms):>8}  {breaker:<12} {rate}")  # fmt: skip
            if row.error:
                print(f"{'':<4}{row.error}")
            if row.breaker and row.breaker.get("last_error") and row.breaker["state"] != "closed":
                print(f"{'':<4}breaker since {row.breaker['since']}: {row.breaker['last_error']}")
    return EXIT_OK if all(row.reachable for row in rows) else EXIT_FAILURE


async def _providers(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "providers_command", None) == "check":
        return await _providers_check(args, settings)
    rows: list[dict[str, Any]] = []
    for spec in configured(settings):
        row: dict[str, Any] = {
            "id": spec.id,
            "label": spec.label,
            "default_model": spec.default_model(settings),
            "capabilities": sorted(spec.capabilities),
        }
        if not args.no_models:
            provider = create(spec.id, settings)
            try:
                row["models"] = [m.id for m in await provider.list_models()]
            except ProviderError as exc:
                row["models_error"] = str(exc)
            finally:
                await provider.aclose()
        rows.append(row)
    unconfigured = [
        {"id": s.id, "missing": s.missing(settings)}
        for s in SPECS.values()
        if not s.is_mock and not s.is_configured(settings)
    ]
    if args.json:
        print(json.dumps({"configured": rows, "not_configured": unconfigured}, indent=2))
        return EXIT_OK
    for row in rows:
        print(f"{row['id']:<11} {row['label']}")
        print(f"{'':<11} default model: {_fmt(row['default_model'])}")
        print(f"{'':<11} can: {', '.join(row['capabilities'])}")
        if "models" in row:
            print(f"{'':<11} models: {', '.join(row['models']) or '(none listed)'}")
        if "models_error" in row:
            print(f"{'':<11} models: could not list ({row['models_error']})")
    if unconfigured:
        print()
        print("not configured (set these in .env to enable):")
        for item in unconfigured:
            print(f"  {item['id']:<11} {' and '.join(item['missing'])}")
    return EXIT_OK


async def _ask(args: argparse.Namespace, settings: Settings) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CliError("the prompt is empty", EXIT_USAGE)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    options: dict[str, Any] = {
        key: value
        for key, value in (
            ("temperature", args.temperature),
            ("max_tokens", args.max_tokens),
            ("seed", args.seed),
        )
        if value is not None
    }
    if args.json_mode:
        options["json_mode"] = True
    call_id: int | None = None
    if args.no_record:
        provider = create(args.provider, settings)
        try:
            response = await _ask_provider(provider, args, messages, options)
        finally:
            await provider.aclose()
        cost = PricingTable(settings.pricing_table_overrides()).cost_usd(
            response.model, response.prompt_tokens, response.completion_tokens
        )
    else:
        create(args.provider, settings)  # configuration errors before touching the database
        async with open_services(settings) as services:
            provider = services.inference.provider(args.provider)
            if args.stream and not args.json:
                response = await _stream_recorded(services, args, messages, options)
                call_id = response.metadata.get("call_id")
                cost = response.metadata.get("cost_usd")
            else:
                result = await services.inference.run(
                    messages, provider=args.provider, model=args.model, options=options
                )
                if not result.ok:
                    assert result.error is not None
                    raise CliError(
                        f"{result.error} (recorded as call {result.call_id}, "
                        f"{len(result.attempts)} attempt(s))"
                    )
                assert result.response is not None
                response, call_id, cost = result.response, result.call_id, result.cost_usd
    if args.json:
        payload = {**response.model_dump(mode="json"), "cost_usd": cost, "call_id": call_id}
        print(json.dumps(payload, indent=2))
        return EXIT_OK
    if not args.stream:
        print(response.text)
    print()
    label = " (mock provider, not a real model)" if provider.is_mock else ""
    print(f"provider: {response.provider}{label}")
    print(f"model: {response.model}")
    print(
        f"tokens: {_fmt(response.prompt_tokens)} in, {_fmt(response.completion_tokens)} out, "
        f"{_fmt(response.total_tokens)} total"
    )
    print(f"latency: {response.latency_ms:.0f} ms")
    print(f"finish reason: {_fmt(response.finish_reason)}")
    print(f"cost: {'unknown (no price for this model)' if cost is None else f'${cost:.6f}'}")
    print(f"recorded: {'no (--no-record)' if call_id is None else f'call {call_id}'}")
    return EXIT_OK


async def _ask_provider(
    provider: Any, args: argparse.Namespace, messages: list[dict[str, str]], options: dict
) -> ProviderResponse:
    if not (args.stream and not args.json):
        return await provider.complete(messages, model=args.model, **options)
    response: ProviderResponse | None = None
    async for item in provider.stream(messages, model=args.model, **options):
        if isinstance(item, ProviderResponse):
            response = item
        else:
            print(item, end="", flush=True)
    print()
    assert response is not None
    return response


async def _stream_recorded(
    services: Any, args: argparse.Namespace, messages: list[dict[str, str]], options: dict
) -> ProviderResponse:
    final = None
    async for item in services.inference.stream(
        messages, provider=args.provider, model=args.model, options=options
    ):
        if isinstance(item, str):
            print(item, end="", flush=True)
        else:
            final = item
    print()
    assert final is not None
    if not final.ok:
        raise CliError(f"{final.error} (recorded as call {final.call_id})")
    response = final.response
    response.metadata["call_id"] = final.call_id
    response.metadata["cost_usd"] = final.cost_usd
    return response


# --- db ---------------------------------------------------------------------------------


async def _db(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.database_url
    if args.db_command == "backup":
        from .ops_commands import run_backup

        return await run_backup(args, settings)
    if args.db_command == "catch-up":
        from .ops_commands import run_catch_up

        return await asyncio.to_thread(run_catch_up, settings)
    if args.db_command == "import-v1":
        from .legacy_commands import IMPORT_INTERRUPTED, run_guarded, run_import

        # In this thread, so Ctrl-C stops it cleanly between transactions.
        return run_guarded(run_import, args, IMPORT_INTERRUPTED)
    if args.db_command == "upgrade":
        before = await asyncio.to_thread(migrate.current, url)
        await asyncio.to_thread(migrate.upgrade, url)
        after = await asyncio.to_thread(migrate.current, url)
        print(f"database {redact_url(url)}: {before or 'empty'} -> {after}")
    else:
        current = await asyncio.to_thread(migrate.current, url)
        print(f"{current or 'empty (run: study-query-llm db upgrade)'} (newest: {migrate.head()})")
    return EXIT_OK


# --- batch ------------------------------------------------------------------------------


def _targets(args: argparse.Namespace) -> list[Target]:
    targets = [Target(args.provider, model) for model in args.model]
    try:
        targets += [Target.parse(text) for text in args.target]
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if not targets:
        spec = get_spec(args.provider)
        default = spec.default_model(_load_settings())
        if not default:
            raise CliError("give at least one --model or --target provider:model", EXIT_USAGE)
        targets = [Target(args.provider, default)]
    return targets


async def _drain(services: Any, job_id: int, args: argparse.Namespace) -> int:
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        counts = await services.batches.counts(job_id)
        bar = tqdm(total=counts.total, initial=counts.finished, unit="call", file=sys.stderr)

    def on_progress(progress: Any) -> None:
        if bar is not None:
            bar.n = progress.done
            bar.set_postfix(
                ok=progress.succeeded,
                failed=progress.failed,
                retries=progress.retrying,
                refresh=False,
            )
            bar.refresh()

    tokens = 0
    cost = 0.0
    retries = 0
    started = time.monotonic()
    try:
        async for outcome in services.batches.run_job(
            job_id,
            concurrency=args.concurrency,
            on_progress=on_progress,
            lease_s=args.lease_seconds,
        ):
            result = outcome.result
            if result is not None:
                retries += max(0, len(result.attempts) - 1)
                if result.response is not None:
                    tokens += result.response.total_tokens or 0
                cost += result.cost_usd or 0.0
    finally:
        if bar is not None:
            bar.close()
    wall = time.monotonic() - started
    counts = await services.batches.counts(job_id)
    job = await services.batches.job(job_id)
    print(f"batch {job_id} ({job['name']}), group {job['group_id']}")
    print(
        f"  {counts.succeeded} succeeded, {counts.failed} failed, {counts.cancelled} cancelled,"
        f" {counts.open} open of {counts.total}"
    )
    print(f"  this run: {retries} retries, {tokens} tokens, ${cost:.6f}, {wall:.1f} s")
    if counts.open:
        print(f"  resume with: study-query-llm batch resume {job_id}")
    return EXIT_OK if counts.failed == 0 and counts.open == 0 else EXIT_FAILURE


async def _batch(args: argparse.Namespace, settings: Settings) -> int:
    command = args.batch_command
    if command == "run":
        prompts = read_prompts(args.prompts)
        targets = _targets(args)
        for target in targets:
            # Configuration errors before the database; the client is not needed yet.
            await create(target.provider, settings).aclose()
        options = {
            key: value
            for key, value in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
            if value is not None
        }
        if args.samples < 1 or args.concurrency < 1:
            raise CliError("--samples and --concurrency must be at least 1", EXIT_USAGE)
        if not args.lease_seconds > 0:
            raise CliError("--lease-seconds must be more than 0", EXIT_USAGE)
        async with open_services(settings) as services:
            job_id = await services.batches.create_job(
                prompts, targets, n_samples=args.samples, options=options, name=args.group
            )
            print(
                f"batch {job_id}: {len(prompts)} prompts x {len(targets)} models x "
                f"{args.samples} samples",
                file=sys.stderr,
            )
            return await _drain(services, job_id, args)
    if command == "resume":
        if args.concurrency < 1:
            raise CliError("--concurrency must be at least 1", EXIT_USAGE)
        if not args.lease_seconds > 0:
            raise CliError("--lease-seconds must be more than 0", EXIT_USAGE)
    async with open_services(settings) as services:
        if command == "list":
            for job in await services.batches.list_jobs():
                counts = job["counts"]
                print(
                    f"{job['id']:>6}  {job['status']:<10} {counts.finished:>7}/{counts.total:<7}"
                    f" {job['name']}"
                )
            return EXIT_OK
        try:
            job = await services.batches.job(args.job_id)
        except LookupError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if command == "status":
            counts = job["counts"]
            print(f"batch {job['id']} ({job['name']}): {job['status']}, group {job['group_id']}")
            for state in ("pending", "claimed", "succeeded", "failed", "cancelled"):
                print(f"  {state:<10} {getattr(counts, state)}")
            print(f"  {'total':<10} {counts.total}")
            return EXIT_OK
        await services.batches.reopen(args.job_id)
        return await _drain(services, args.job_id, args)


async def _auth(args: argparse.Namespace, settings: Settings) -> int:
    from .ops_commands import run_auth

    return await run_auth(args, settings)


COMMANDS = {"providers": _providers, "ask": _ask, "db": _db, "batch": _batch, "auth": _auth}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        args = _build_parser().parse_args(argv)
        settings = _load_settings()
        return asyncio.run(COMMANDS[args.command](args, settings))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except ProviderConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProviderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ValueError, PromptFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RecordingError as exc:
        print(f"error: the call could not be recorded: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (SQLAlchemyError, OSError) as exc:
        print(f"error: database problem: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
