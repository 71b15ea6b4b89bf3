"""GroupService: the few edits a person makes to groups — rename, describe, label calls.

Calls themselves never change; groups and their memberships do. Every method is one
committed transaction through `run_write` (transient errors retried) and is synchronous:
a UI runs it off its event loop. Mistakes a person can fix raise `ValueError`
(an empty or taken name) or `LookupError` (an unknown group or call id).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Engine

from ..db.connection import UnitOfWork, run_write

LABEL = "label"
MAX_NAME_CHARS = 200  # groups.name is VARCHAR(200)


@dataclass(frozen=True)
class Labelled:
    """The outcome of `GroupService.label`: the label group and how many calls were new."""

    group_id: int
    name: str
    added: int
    already: int


def _clean_name(name: str) -> str:
    name = " ".join(str(name or "").split())
    if not name:
        raise ValueError("a group name cannot be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a group name can be at most {MAX_NAME_CHARS} characters long")
    return name


class GroupService:
    """Edits groups; reads go through `StudyService`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def rename(self, group_id: int, name: str) -> str:
        """Give the group a new name (unique within its type); returns the stored name.

        `GroupExistsError` (a ValueError) if another group of the same type has it.
        """
        name = _clean_name(name)
        return run_write(self.engine, lambda uow: uow.groups.rename(group_id, name).name)

    def describe(self, group_id: int, description: str | None) -> None:
        """Set the group's description (empty text clears it)."""
        text = (description or "").strip() or None
        run_write(self.engine, lambda uow: uow.groups.describe(group_id, description=text))

    def label(self, name: str, call_ids: Iterable[int]) -> Labelled:
        """Add calls to the `label` group called `name` (created if missing).

        Calls already in the label are skipped. `LookupError` names any unknown call id
        (nothing is written then).
        """
        name = _clean_name(name)
        wanted = list(dict.fromkeys(int(i) for i in call_ids))
        if not wanted:
            raise ValueError("choose at least one call to label")

        def write(uow: UnitOfWork) -> Labelled:
            found = {call.id for call in uow.calls.get_many(wanted)}
            missing = [i for i in wanted if i not in found]
            if missing:
                shown = ", ".join(str(i) for i in missing[:10])
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise LookupError(f"no call with id {shown}{more}")
            group = uow.groups.get_or_create(LABEL, name)
            added = uow.groups.add_members(group.id, wanted)
            return Labelled(group.id, group.name, len(added), len(wanted) - len(added))

        return run_write(self.engine, write)


def parse_ids(text: str) -> list[int]:
    """Call ids from text like ``"12, 15 18"``; `ValueError` names anything that is not one."""
    ids = []
    for part in str(text or "").replace(",", " ").split():
        if not part.isdigit():
            raise ValueError(f"{part[:40]!r} is not a call id (use whole numbers)")
        ids.append(int(part))
    return ids
