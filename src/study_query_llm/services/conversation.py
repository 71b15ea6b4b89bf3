"""Multi-turn conversations, stored as a `conversation` group of calls in turn order.

Nothing lives only in memory: the history of a conversation is read back from its recorded
calls, so a conversation resumes after a restart exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from ..db.column_types import utcnow
from ..db.connection import UnitOfWork
from ._common import db_io
from .inference import InferenceService, RunResult

GROUP_TYPE = "conversation"


@dataclass(frozen=True)
class Conversation:
    """A conversation's settings as stored in its group."""

    id: int
    name: str
    system_prompt: str | None
    provider: str
    model: str | None


class ConversationService:
    """Start, continue, resume, list and clear conversations."""

    def __init__(self, engine: Engine, inference: InferenceService) -> None:
        self.engine = engine
        self.inference = inference

    async def _io(self, fn: Callable[[UnitOfWork], Any], *, write: bool = False) -> Any:
        return await db_io(self.engine, fn, write=write)

    async def start(
        self,
        *,
        provider: str,
        model: str | None = None,
        system_prompt: str | None = None,
        name: str | None = None,
    ) -> Conversation:
        """Create a conversation (an empty group) with its system prompt and target."""
        self.inference.provider(provider)  # fail now if unknown or not configured
        name = name or f"conversation {utcnow():%Y-%m-%d %H:%M:%S.%f}"
        meta = {"system_prompt": system_prompt, "provider": provider, "model": model}

        def create(uow: UnitOfWork) -> int:
            return uow.groups.create(GROUP_TYPE, name, metadata=meta).id

        group_id = await self._io(create, write=True)
        return Conversation(group_id, name, system_prompt, provider, model)

    async def get(self, conversation_id: int) -> Conversation:
        def read(uow: UnitOfWork) -> Conversation:
            group = uow.groups.get(conversation_id)
            if group is None or group.group_type != GROUP_TYPE:
                raise LookupError(f"no conversation with id {conversation_id}")
            meta = group.metadata_json or {}
            return Conversation(
                group.id,
                group.name,
                meta.get("system_prompt"),
                meta.get("provider", "mock"),
                meta.get("model"),
            )

        return await self._io(read)

    async def list(self) -> list[Conversation]:
        def read(uow: UnitOfWork) -> list[Conversation]:
            return [
                Conversation(
                    g.id,
                    g.name,
                    (g.metadata_json or {}).get("system_prompt"),
                    (g.metadata_json or {}).get("provider", "mock"),
                    (g.metadata_json or {}).get("model"),
                )
                for g in uow.groups.list_groups(GROUP_TYPE)
            ]

        return await self._io(read)

    async def history(self, conversation_id: int) -> list[dict[str, str]]:
        """The messages so far (system, then user/assistant turns), from the record."""
        conversation = await self.get(conversation_id)

        def read(uow: UnitOfWork) -> list[dict[str, str]]:
            messages: list[dict[str, str]] = []
            if conversation.system_prompt:
                messages.append({"role": "system", "content": conversation.system_prompt})
            members = [m for m in uow.groups.members(conversation_id) if m.role == "turn"]
            calls = {c.id: c for c in uow.calls.get_many([m.call_id for m in members])}
            for member in members:
                call = calls.get(member.call_id)
                if call is None or call.status != "success" or not call.response_json:
                    continue
                sent = call.request_json.get("messages", [])
                user = next((m for m in reversed(sent) if m.get("role") == "user"), None)
                if user is None:
                    continue
                messages.append({"role": "user", "content": user["content"]})
                messages.append({"role": "assistant", "content": call.response_json["text"]})
            return messages

        return await self._io(read)

    async def send(
        self, conversation_id: int, text: str, *, options: dict[str, Any] | None = None
    ) -> RunResult:
        """Add a user turn, call the model with the whole history, record it in order."""
        if not text.strip():
            raise ValueError("the message is empty")
        conversation = await self.get(conversation_id)
        messages = [*await self.history(conversation_id), {"role": "user", "content": text}]
        result = await self.inference.run(
            messages,
            provider=conversation.provider,
            model=conversation.model,
            options=options,
            group_id=conversation_id,
            role="turn",
            metadata={"conversation_id": conversation_id},
        )
        return result

    async def clear(self, conversation_id: int) -> int:
        """Forget the turns (the calls stay in the record); returns how many were removed."""
        await self.get(conversation_id)

        def clear(uow: UnitOfWork) -> int:
            removed = 0
            for call_id in uow.groups.member_call_ids(conversation_id):
                removed += int(uow.groups.remove_member(conversation_id, call_id))
            return removed

        return await self._io(clear, write=True)
