"""The `study-query-llm` command line: providers, ask, and (as they arrive) db and batch commands.

Every failure is one clear line on stderr and a non-zero exit: 2 for bad arguments or
configuration, 1 for a provider or runtime failure. No tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from .config import Settings
from .providers import (
    SPECS,
    ProviderConfigurationError,
    ProviderError,
    ProviderResponse,
    configured,
    create,
)
from .providers.pricing import PricingTable

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
    return parser


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise CliError(f"invalid settings: {problems}", EXIT_USAGE) from None


def _fmt(value: Any, suffix: str = "") -> str:
    return "—" if value is None else f"{value}{suffix}"


async def _providers(args: argparse.Namespace, settings: Settings) -> int:
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
    provider = create(args.provider, settings)
    try:
        response: ProviderResponse | None = None
        if args.stream and not args.json:
            async for item in provider.stream(messages, model=args.model, **options):
                if isinstance(item, ProviderResponse):
                    response = item
                else:
                    print(item, end="", flush=True)
            print()
        else:
            response = await provider.complete(messages, model=args.model, **options)
    finally:
        await provider.aclose()
    assert response is not None
    cost = PricingTable(settings.pricing_table_overrides()).cost_usd(
        response.model, response.prompt_tokens, response.completion_tokens
    )
    if args.json:
        print(json.dumps({**response.model_dump(mode="json"), "cost_usd": cost}, indent=2))
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
    return EXIT_OK


COMMANDS = {"providers": _providers, "ask": _ask}


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
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
