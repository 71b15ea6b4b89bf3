"""Group lists on a big database: what the Groups tab and the group pickers read.

    .venv/bin/python bench/groups_bench.py                  # the default SQLite and PostgreSQL DBs
    .venv/bin/python bench/groups_bench.py --db postgres --runs 7

Times (median of `--runs` after one untimed first run, whose time is shown too):

- the Groups tab's list, a page of 50 groups with their calls' statistics: the newest
  page, the oldest page, a page of one group type, a page with a provider filter on the
  statistics; and the count of groups for the pager;
- the pickers' plain lists (`group_choices`, with and without member counts);
- unless `--skip-every`, every group's statistics at once (what the tab read before it
  listed a page at a time), once.

Each page is checked against the same groups' rows in the every-group listing (same ids
in the same order, same counts); a mismatch makes the script exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import (
    add_db_argument,
    chosen_urls,
    markdown_table,
    median_ms,
    print_header,
    show_url,
    time_runs,
)
from sqlalchemy import func, select

from study_query_llm.db.connection import UnitOfWork, get_engine
from study_query_llm.db.filters import CallFilters
from study_query_llm.db.models_v2 import Group, GroupMember
from study_query_llm.services.study import StudyService

PAGE = 50


def sizes(url: str) -> tuple[int, int]:
    """(groups, memberships) in the database."""
    with UnitOfWork(get_engine(url)) as uow:
        groups = uow.session.scalar(select(func.count()).select_from(Group)) or 0
        members = uow.session.scalar(select(func.count()).select_from(GroupMember)) or 0
    return int(groups), int(members)


def bench_one(url: str, runs: int, *, skip_every: bool) -> bool:
    """Time the group lists on one database; False when a page disagrees with the whole."""
    failed = False
    study = StudyService(get_engine(url))
    n_groups, n_members = sizes(url)
    print(f"### {show_url(url)}: {n_groups:,} groups, {n_members:,} memberships\n")
    total = study.group_count()
    last = max(0, total - PAGE)
    kind = str(study.group_choices()["group_type"].mode().iloc[0]) if total else None
    provider = (study.facets().get("providers") or [None])[0]
    filters = CallFilters(providers=(provider,)) if provider else CallFilters()
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("group_count() (the pager)", study.group_count),
        (f"groups(limit={PAGE}) newest page", lambda: study.groups(limit=PAGE)),
        (
            f"groups(limit={PAGE}, offset={last:,}) oldest page",
            lambda: study.groups(limit=PAGE, offset=last),
        ),
        (
            f"groups({kind!r}, limit={PAGE}) one type",
            lambda: study.groups(kind, limit=PAGE),
        ),
        (
            f"groups(providers={provider!r}, limit={PAGE}) filtered statistics",
            lambda: study.groups(filters=filters, limit=PAGE),
        ),
        ("group_choices() (sidebar filter)", study.group_choices),
        (
            "group_choices(members=True) (Embeddings picker)",
            lambda: study.group_choices(members=True),
        ),
    ]
    rows = []
    results: dict[str, Any] = {}
    for label, call in calls:
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        times, result = time_runs(call, runs, warmup=0)
        results[label] = result
        rows.append([label, f"{first * 1000:,.0f}", f"{median_ms(times):,.0f}"])
    if not skip_every:
        start = time.perf_counter()
        every = study.groups()
        rows.append(
            [
                "groups() every group at once (before paging)",
                f"{(time.perf_counter() - start) * 1000:,.0f}",
                "–",
            ]
        )
        newest = results[f"groups(limit={PAGE}) newest page"]
        oldest = results[f"groups(limit={PAGE}, offset={last:,}) oldest page"]
        for page, expected in ((newest, every.head(PAGE)), (oldest, every.iloc[last:])):
            same = list(page["id"]) == list(expected["id"]) and (
                page[["members", "calls", "failures"]].to_numpy().tolist()
                == expected[["members", "calls", "failures"]].to_numpy().tolist()
            )
            if not same:
                failed = True
                print("MISMATCH: a page differs from the every-group listing", file=sys.stderr)
    print(markdown_table(["call", "first ms", "median ms"], rows))
    print()
    return not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_db_argument(parser)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per call (default 5)")
    parser.add_argument(
        "--skip-every", action="store_true", help="do not time every group's statistics"
    )
    args = parser.parse_args(argv)
    urls = chosen_urls(args.db)
    if not urls:
        print("no benchmark database yet: run bench/generate.py first", file=sys.stderr)
        return 2
    print_header("groups_bench.py", f"{args.runs} timed runs per call after one untimed run")
    failed = False
    for url in urls:
        failed = not bench_one(url, args.runs, skip_every=args.skip_every) or failed
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
