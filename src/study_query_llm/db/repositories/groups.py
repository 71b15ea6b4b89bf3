"""`GroupRepository`: named groups of calls (experiments, batches, sweeps, labels...).

Groups are unique by (group_type, name) and stay editable. Members keep the order in
which they were added: `position` counts up from 0 within a group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from study_query_llm.db.bulk import insert_rows
from study_query_llm.db.errors import GroupExistsError, GroupNotFoundError
from study_query_llm.db.models_v2 import Group, GroupMember

_UNSET: Any = object()


_GROUPS = Group.__table__
_MEMBERS = GroupMember.__table__
_FIND_GROUPS = (
    select(_GROUPS.c.id)
    .where(_GROUPS.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_GROUPS.c.id)
)
_LOCK_GROUPS = _FIND_GROUPS.with_for_update()
_LAST_POSITION = select(func.max(_MEMBERS.c.position)).where(
    _MEMBERS.c.group_id == bindparam("group_id")
)


class GroupRepository:
    """Creates, finds, edits and fills groups."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(
        self,
        group_type: str,
        name: str,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Group:
        """A new group; `GroupExistsError` if (group_type, name) is taken.

        (Two sessions creating the same group at once: the loser gets the database's
        IntegrityError instead. Use `get_or_create` where that can happen.)
        """
        if self.find(group_type, name) is not None:
            raise GroupExistsError(f"a {group_type!r} group named {name!r} already exists")
        group = Group(
            group_type=group_type, name=name, description=description, metadata_json=metadata
        )
        self.session.add(group)
        self.session.flush()
        return group

    def find(self, group_type: str, name: str) -> Group | None:
        """The group with this type and name, or None."""
        stmt = select(Group).where(Group.group_type == group_type, Group.name == name)
        return self.session.scalars(stmt).first()

    def get(self, group_id: int) -> Group | None:
        """The group with this id, or None."""
        return self.session.get(Group, group_id)

    def get_or_create(
        self,
        group_type: str,
        name: str,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Group:
        """The group with this type and name, created if missing (safe under races)."""
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        values = {
            "group_type": group_type,
            "name": name,
            "description": description,
            "metadata_json": metadata,
        }
        stmt = (
            insert(Group)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["group_type", "name"])
        )
        self.session.execute(stmt)
        group = self.find(group_type, name)
        assert group is not None  # inserted above or already there
        return group

    def list_groups(self, group_type: str | None = None) -> list[Group]:
        """Every group (of one type, when given), ordered by type then name."""
        stmt = select(Group).order_by(Group.group_type, Group.name)
        if group_type is not None:
            stmt = stmt.where(Group.group_type == group_type)
        return list(self.session.scalars(stmt))

    def rename(self, group_id: int, name: str) -> Group:
        """Give the group a new name; `GroupExistsError` if another group has it."""
        group = self._require(group_id)
        other = self.find(group.group_type, name)
        if other is not None and other.id != group.id:
            raise GroupExistsError(f"a {group.group_type!r} group named {name!r} already exists")
        group.name = name
        self.session.flush()
        return group

    def describe(
        self,
        group_id: int,
        description: str | None = _UNSET,
        metadata: dict[str, Any] | None = _UNSET,
    ) -> Group:
        """Set the description and/or metadata (arguments left out stay as they are)."""
        group = self._require(group_id)
        if description is not _UNSET:
            group.description = description
        if metadata is not _UNSET:
            group.metadata_json = metadata
        self.session.flush()
        return group

    def delete(self, group_id: int) -> None:
        """Delete the group and its memberships (the calls themselves stay)."""
        self.session.delete(self._require(group_id))
        self.session.flush()

    def add_members(
        self, group_id: int, call_ids: Iterable[int], *, role: str | None = None
    ) -> list[GroupMember]:
        """Append calls to the group in the given order; calls already in it are skipped.

        Returns the new memberships. On PostgreSQL the group row is locked for the rest
        of the transaction, so concurrent appends get distinct positions.
        """
        self._require(group_id, lock=True)
        wanted = list(dict.fromkeys(call_ids))
        if not wanted:
            return []
        present = set(
            self.session.scalars(
                select(GroupMember.call_id).where(
                    GroupMember.group_id == group_id, GroupMember.call_id.in_(wanted)
                )
            )
        )
        last = self.session.scalar(
            select(func.max(GroupMember.position)).where(GroupMember.group_id == group_id)
        )
        next_position = 0 if last is None else last + 1
        members = []
        for call_id in wanted:
            if call_id in present:
                continue
            members.append(
                GroupMember(group_id=group_id, call_id=call_id, position=next_position, role=role)
            )
            next_position += 1
        self.session.add_all(members)
        self.session.flush()
        return members

    def add_member_at(
        self,
        group_id: int,
        call_id: int,
        *,
        position: int | None = None,
        role: str | None = None,
    ) -> GroupMember:
        """Put one call in the group at a given position (None: append after the last).

        Positions need not be contiguous: a sweep can place each call at its planned
        index as results arrive in any order. A call already in the group is left where
        it is, and its existing membership is returned.
        """
        existing = self._member(group_id, call_id)
        if existing is not None:
            return existing
        if position is None:
            return self.add_members(group_id, [call_id], role=role)[0]
        self._require(group_id)
        member = GroupMember(group_id=group_id, call_id=call_id, position=position, role=role)
        self.session.add(member)
        self.session.flush()
        return member

    def place_new_calls(
        self, placements: Sequence[tuple[int, int, int | None, str | None]]
    ) -> None:
        """Put calls recorded in this transaction into groups, all in one statement.

        Each placement is (group_id, call_id, position, role), as for `add_member_at`;
        position None appends after the group's last member (that group's row is locked,
        as in `add_members`). The calls must be new (in no group yet), as the recorder's
        are: nothing is looked up per call.
        """
        if not placements:
            return
        appending = {group_id for group_id, _, position, _ in placements if position is None}
        placing = {group_id for group_id, *_ in placements}
        # Plain statements (this runs with every recorded batch): check the groups exist,
        # locking the ones appended to, in id order.
        connection = self.session.connection()
        found: set[int] = set()
        for ids, statement in ((appending, _LOCK_GROUPS), (placing - appending, _FIND_GROUPS)):
            if ids:
                found.update(connection.scalars(statement, {"ids": sorted(ids)}))
        missing = sorted(placing - found)
        if missing:
            raise GroupNotFoundError(f"no group with id {missing[0]}")
        next_position = {}
        for group_id in sorted(appending):
            last = connection.scalar(_LAST_POSITION, {"group_id": group_id})
            next_position[group_id] = 0 if last is None else last + 1
        rows = []
        for group_id, call_id, position, role in placements:
            if position is None:
                position = next_position[group_id]
                next_position[group_id] += 1
            rows.append(
                {"group_id": group_id, "call_id": call_id, "position": position, "role": role}
            )
        insert_rows(self.session, GroupMember, rows)

    def set_member_role(self, group_id: int, call_id: int, role: str | None) -> bool:
        """Change the role of a call in the group; False if the call is not in it."""
        member = self._member(group_id, call_id)
        if member is None:
            return False
        member.role = role
        self.session.flush()
        return True

    def members(self, group_id: int) -> list[GroupMember]:
        """The group's memberships in position order."""
        stmt = (
            select(GroupMember)
            .where(GroupMember.group_id == group_id)
            .order_by(GroupMember.position, GroupMember.id)
        )
        return list(self.session.scalars(stmt))

    def member_call_ids(self, group_id: int) -> list[int]:
        """The ids of the group's calls in position order."""
        stmt = (
            select(GroupMember.call_id)
            .where(GroupMember.group_id == group_id)
            .order_by(GroupMember.position, GroupMember.id)
        )
        return list(self.session.scalars(stmt))

    def remove_member(self, group_id: int, call_id: int) -> bool:
        """Take a call out of the group (positions of the others are kept)."""
        member = self._member(group_id, call_id)
        if member is None:
            return False
        self.session.delete(member)
        self.session.flush()
        return True

    def groups_of_call(self, call_id: int) -> list[Group]:
        """The groups a call belongs to, ordered by type then name."""
        stmt = (
            select(Group)
            .join(GroupMember, GroupMember.group_id == Group.id)
            .where(GroupMember.call_id == call_id)
            .order_by(Group.group_type, Group.name)
        )
        return list(self.session.scalars(stmt))

    def _member(self, group_id: int, call_id: int) -> GroupMember | None:
        stmt = select(GroupMember).where(
            GroupMember.group_id == group_id, GroupMember.call_id == call_id
        )
        return self.session.scalars(stmt).first()

    def _require(self, group_id: int, *, lock: bool = False) -> Group:
        group = self.session.get(Group, group_id, with_for_update=lock or None)
        if group is None:
            raise GroupNotFoundError(f"no group with id {group_id}")
        return group
