"""Reads the providers file (TOML, YAML or JSON): groups, capability overrides, listing rules.

The file named by `PROVIDER_GROUPS_FILE` holds up to three top-level tables::

    [groups.fast]            # provider groups (see `providers.group`)
    [capabilities."my-.*"]   # capability overrides (see `providers.capabilities`)
    [listing_rules.vllm]     # JMESPath listing rules (see `providers.discovery`)

Reads are cached by path and modification time, so an edited file is picked up by the
next `create()` without a restart. A file that cannot be read or parsed is a `ValueError`
naming the file and the problem.
"""

from __future__ import annotations

import json
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .capabilities import CapabilityRegistry
from .discovery import ListingRule, parse_rules
from .group import GroupConfig, parse_groups

if TYPE_CHECKING:
    from ..config import Settings

SECTIONS = ("groups", "capabilities", "listing_rules")
WRITABLE_SUFFIXES = (".yaml", ".yml", ".json")

_cache: dict[Path, tuple[float, dict[str, Any]]] = {}
_lock = threading.Lock()


def read_providers_file(path: str | Path) -> dict[str, Any]:
    """The parsed file as a dict with the known sections; `{}` sections when absent."""
    file = Path(path).expanduser()
    try:
        mtime = file.stat().st_mtime
    except FileNotFoundError:
        raise ValueError(f"PROVIDER_GROUPS_FILE: {file} does not exist") from None
    except OSError as exc:
        raise ValueError(f"PROVIDER_GROUPS_FILE: cannot read {file}: {exc}") from None
    with _lock:
        cached = _cache.get(file)
        if cached is not None and cached[0] == mtime:
            return cached[1]
    data = _parse(file)
    with _lock:
        _cache[file] = (mtime, data)
    return data


def _parse(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"PROVIDER_GROUPS_FILE: cannot read {file}: {exc}") from None
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            raw: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text) if text.strip() else {}
        else:
            raise ValueError(f"unknown file type {suffix!r}; use .toml, .yaml, .yml or .json")
    except ValueError as exc:  # tomllib, json and our own errors
        raise ValueError(f"PROVIDER_GROUPS_FILE {file}: {_first_line(exc)}") from None
    except Exception as exc:  # yaml.YAMLError
        raise ValueError(f"PROVIDER_GROUPS_FILE {file}: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"PROVIDER_GROUPS_FILE {file}: the top level must be a table/mapping")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"PROVIDER_GROUPS_FILE {file}: unknown section {unknown[0]!r}; "
            f"use {', '.join(SECTIONS)}"
        )
    for section in SECTIONS:
        value = raw.setdefault(section, {})
        if not isinstance(value, dict):
            raise ValueError(f"PROVIDER_GROUPS_FILE {file}: [{section}] must be a table/mapping")
    return raw


def write_groups(path: str | Path, groups: dict[str, dict[str, Any]]) -> None:
    """Replace the [groups] section of a YAML or JSON providers file, keeping the others.

    TOML files are read-only here (the standard library cannot write TOML): edit them by
    hand. The file is written to a temporary name and renamed, so readers never see half.
    """
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(
            f"groups can only be saved to a .yaml or .json file, not {file.name} "
            "(edit it by hand, or point PROVIDER_GROUPS_FILE at a .yaml file)"
        )
    data = read_providers_file(file) if file.exists() else {s: {} for s in SECTIONS}
    data = {**data, "groups": groups}
    data = {key: value for key, value in data.items() if value}
    if suffix == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(f".{file.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(file)
    with _lock:
        _cache.pop(file, None)
        _assembled.clear()


def _first_line(exc: BaseException) -> str:
    """The error on one line (YAML errors span several: what, where)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text[:300] or type(exc).__name__


# --- everything configured, assembled ------------------------------------------------------


@dataclass(frozen=True)
class ProvidersConfig:
    """Groups, capability rules and listing rules from settings and the providers file."""

    groups: dict[str, GroupConfig]
    capabilities: CapabilityRegistry
    listing_rules: dict[str, ListingRule]
    file: Path | None


_assembled: dict[tuple[Any, ...], ProvidersConfig] = {}


def providers_file(settings: Settings) -> Path | None:
    """The providers file named by PROVIDER_GROUPS_FILE, or None."""
    return (
        Path(settings.provider_groups_file).expanduser() if settings.provider_groups_file else None
    )


def load_providers_config(settings: Settings) -> ProvidersConfig:
    """Parse (once per change) the groups, capability overrides and listing rules.

    Sources, later ones winning: the providers file, then PROVIDER_GROUPS,
    CAPABILITY_OVERRIDES and MODEL_LISTING_RULES. Any error is a one-line `ValueError`.
    """
    file = providers_file(settings)
    stamp = None
    if file is not None:
        try:
            stamp = file.stat().st_mtime
        except OSError:
            stamp = -1.0  # read_providers_file reports the problem
    key = (
        str(file),
        stamp,
        settings.provider_groups,
        settings.capability_overrides,
        settings.model_listing_rules,
    )
    with _lock:
        cached = _assembled.get(key)
    if cached is not None:
        return cached
    data = read_providers_file(file) if file is not None else {s: {} for s in SECTIONS}
    where = f"PROVIDER_GROUPS_FILE {file}"
    groups = parse_groups(data["groups"], where)
    if settings.provider_groups:
        try:
            inline = json.loads(settings.provider_groups)
        except ValueError as exc:
            raise ValueError(f"PROVIDER_GROUPS is not valid JSON: {exc}") from None
        groups.update(parse_groups(inline, "PROVIDER_GROUPS"))
    capabilities = CapabilityRegistry.from_config(
        (f"{where} [capabilities]", data["capabilities"] or None),
        ("CAPABILITY_OVERRIDES", settings.capability_overrides),
    )
    rules = parse_rules(data["listing_rules"] or None, f"{where} [listing_rules]")
    rules.update(parse_rules(settings.model_listing_rules, "MODEL_LISTING_RULES"))
    config = ProvidersConfig(groups, capabilities, rules, file)
    with _lock:
        if len(_assembled) > 32:
            _assembled.clear()
        _assembled[key] = config
    return config
