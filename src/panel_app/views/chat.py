"""Chat tab: a multi-turn, streamed conversation with one model, stored as a conversation group.

Stable CSS classes (hooks for UI tests):
- ``sqllm-chat``                the chat interface (feed and input; messages are escaped text)
- ``sqllm-chat-provider``       provider picker for a new conversation (mock shows "(mock)")
- ``sqllm-chat-models``         the provider's listed models (choosing one fills the model box)
- ``sqllm-chat-model``          model text box for a new conversation (free text)
- ``sqllm-chat-system``         system prompt for a new conversation
- ``sqllm-chat-new``            "New conversation" button
- ``sqllm-chat-conversations``  stored conversations to resume
- ``sqllm-chat-clear``          Clear (forgets the turns; the calls stay in the record)
- ``sqllm-chat-info``           which conversation is open and with which model
- ``sqllm-chat-text``           the text of every message (escaped, in a <pre>)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import panel as pn
import param

from study_query_llm.services.conversation import Conversation
from study_query_llm.services.inference import RunResult

from ..safe import TEXT_MAX_CHARS, escape, pre
from ..state import AppState, describe_error, notify
from .inference import TEXT_CSS, USER_ERRORS, ModelPicker, is_mock

log = logging.getLogger(__name__)

USER_NAME = "You"
NO_CONVERSATION = 0  # the conversations picker's "nothing chosen" value
# No copy, reaction or edit icons on messages: they would act on the page only, never on the
# record, and Panel's named icons fetch a webfont from a CDN (a console error offline).
MESSAGE_PARAMS = {
    "show_copy_icon": False,
    "show_reaction_icons": False,
    "show_edit_icon": False,
    "reaction_icons": {},
}


class PlainText(pn.pane.HTML):
    """A pane whose `object` is raw text, sent to the page escaped inside a <pre>.

    Chat callbacks read a message's text back from its pane's `object`, so the pane keeps
    the raw text and escapes only on the way to the browser.
    """

    priority = False  # never picked by pn.panel(); only used explicitly

    @classmethod
    def applies(cls, obj: object) -> bool:
        return isinstance(obj, str)

    def _transform_object(self, obj: object) -> dict:
        return super()._transform_object(pre(obj))


def render_text(value: object) -> PlainText:
    """Message text as escaped, line-preserving HTML: a prompt's markup is shown, never run."""
    # "message" keeps the chat bubble's look (Panel adds it only to panes without classes).
    return PlainText(
        "" if value is None else str(value),
        css_classes=["message", "sqllm-chat-text"],
        stylesheets=[TEXT_CSS],
    )


# Inline icons: Panel's named icons load a webfont from a CDN, which fails offline.
_SEND_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="18" height="18" viewBox="0 0 24 24" '
    'fill="none" stroke="currentColor" stroke-width="2"><path d="M10 14l11-11M21 3l-6.5 18a.55'
    ' .55 0 0 1-1 0L10 14l-7-3.5a.55 .55 0 0 1 0-1L21 3"/></svg>'
)
_STOP_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="18" height="18" viewBox="0 0 24 24" '
    'fill="none" stroke="currentColor" stroke-width="2"><rect x="5" y="5" width="14" '
    'height="14" rx="2"/></svg>'
)


_EDIT_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="15" height="15" viewBox="0 0 24 24" '
    'fill="none" stroke="currentColor" stroke-width="2"><path d="M4 20h4L18.5 9.5a2.8 2.8 0 0 '
    '0-4-4L4 16v4"/></svg>'
)


class TextChatMessage(pn.chat.ChatMessage):
    """A ChatMessage whose (hidden) edit icon is inline SVG, so no webfont is fetched."""

    def __init__(self, object=None, **params):
        super().__init__(object, **params)
        self.edit_icon.param.update(icon=_EDIT_SVG, active_icon=_STOP_SVG)


class TextChatInterface(pn.chat.ChatInterface):
    """A ChatInterface whose messages are `TextChatMessage`s."""

    _message_type = TextChatMessage


def assistant_name(conversation: Conversation) -> str:
    """Who answers: provider:model, with "(mock)" for the mock provider (plain text)."""
    model = conversation.model or "default model"
    return f"{conversation.provider}:{model}" + (
        " (mock)" if is_mock(conversation.provider) else ""
    )


class ChatView(pn.viewable.Viewer):
    """Streams each answer; every turn is a recorded call in the conversation's group."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")
    conversation = param.Parameter(
        default=None, doc="The open Conversation (None until the first message is sent)."
    )

    def __init__(self, **params):
        super().__init__(**params)
        self._picker = ModelPicker(state=self.state, prefix="chat")
        self._system = pn.widgets.TextAreaInput(
            name="System prompt (new conversation)",
            placeholder="You are a helpful assistant.",
            rows=2,
            sizing_mode="stretch_width",
            max_length=TEXT_MAX_CHARS,
            css_classes=["sqllm-chat-system"],
        )
        self._new = pn.widgets.Button(
            name="New conversation",
            button_type="primary",
            width=170,
            align="end",
            css_classes=["sqllm-chat-new"],
        )
        self._stored = pn.widgets.Select(
            name="Resume a stored conversation",
            options={"(none)": NO_CONVERSATION},
            value=NO_CONVERSATION,
            width=380,
            css_classes=["sqllm-chat-conversations"],
        )
        self._clear = pn.widgets.Button(
            name="Clear",
            button_type="warning",
            width=100,
            align="end",
            css_classes=["sqllm-chat-clear"],
        )
        self._info = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["sqllm-chat-info"])
        self._chat = TextChatInterface(
            callback=self._respond,
            callback_user="assistant",
            callback_exception=self._on_callback_error,
            user=USER_NAME,
            renderers=[render_text],
            message_params=dict(MESSAGE_PARAMS),
            # Hidden buttons too: any named icon makes the page fetch the CDN webfont.
            button_properties={
                "send": {"icon": _SEND_SVG},
                "stop": {"icon": _STOP_SVG},
                "rerun": {"icon": _STOP_SVG},
                "undo": {"icon": _STOP_SVG},
                "clear": {"icon": _STOP_SVG},
            },
            show_rerun=False,
            show_undo=False,
            show_clear=False,
            sizing_mode="stretch_width",
            height=560,
        )
        # ChatInterface does not put its css_classes on the page, so a wrapper carries the hook.
        self._chat_box = pn.Column(
            self._chat, sizing_mode="stretch_width", css_classes=["sqllm-chat"]
        )

        self._new.on_click(self._on_new)
        self._clear.on_click(self._on_clear)
        self._stored.param.watch(self._on_stored, "value")
        self._show_info()
        if pn.state.curdoc is not None:
            pn.state.onload(self._load)

    # --- loading ---------------------------------------------------------------------------

    async def _load(self) -> None:
        await self._load_conversations()

    async def _load_conversations(self, select: int | None = None) -> None:
        """Fill the stored-conversations picker (newest first), optionally choosing one."""
        try:
            stored = await self.state.services.conversations.list()
        except USER_ERRORS as exc:
            notify(f"Could not list conversations: {describe_error(exc)}", "error")
            return
        options = {"(none)": NO_CONVERSATION} | {
            f"#{c.id} {c.name} · {assistant_name(c)}": c.id
            for c in sorted(stored, key=lambda c: c.id, reverse=True)
        }
        current = select if select is not None else self._stored.value
        self._stored.options = options
        self._stored.value = current if current in options.values() else NO_CONVERSATION

    # --- conversation lifecycle ------------------------------------------------------------

    @param.depends("conversation", watch=True)
    def _show_info(self) -> None:
        conversation = self.conversation
        locked = conversation is not None
        self._picker.disabled = locked
        self._system.disabled = locked
        if conversation is None:
            self._info.object = (
                "New conversation: it starts with your first message, using the provider, "
                "model and system prompt above."
            )
            return
        system = (
            f" · system prompt: <i>{escape(conversation.system_prompt)}</i>"
            if conversation.system_prompt
            else ""
        )
        self._info.object = (
            f"Conversation <b>#{conversation.id}</b> with <b>{escape(assistant_name(conversation))}"
            f"</b>{system}. Press “New conversation” to change the model."
        )

    async def _ensure_conversation(self) -> Conversation:
        if self.conversation is not None:
            return self.conversation
        provider = self._picker.provider_id
        model = self._picker.model_id
        system = (self._system.value or "").strip() or None
        conversation = await self.state.services.conversations.start(
            provider=provider, model=model, system_prompt=system
        )
        self.conversation = conversation
        await self._load_conversations(select=conversation.id)
        return conversation

    def _on_new(self, _event=None) -> None:
        self.conversation = None  # first, so the picker change below loads nothing
        self._chat.clear()
        self._stored.value = NO_CONVERSATION

    async def _on_stored(self, event) -> None:
        current = self.conversation.id if self.conversation is not None else NO_CONVERSATION
        if event.new == current:
            return  # already open (e.g. the picker follows a conversation just started)
        if event.new == NO_CONVERSATION:
            self._on_new()
            return
        conversations = self.state.services.conversations
        try:
            conversation = await conversations.get(event.new)
            history = await conversations.history(event.new)
        except USER_ERRORS as exc:
            notify(f"Could not open the conversation: {describe_error(exc)}", "error")
            return
        self.conversation = conversation
        self._picker.set(conversation.provider, conversation.model)
        self._system.value = conversation.system_prompt or ""
        name = escape(assistant_name(conversation))  # user names are rendered as HTML
        self._chat.objects = [
            TextChatMessage(
                message["content"],
                user=USER_NAME if message["role"] == "user" else name,
                renderers=[render_text],
                **MESSAGE_PARAMS,
            )
            for message in history
            if message["role"] in ("user", "assistant")
        ]

    async def _on_clear(self, _event=None) -> None:
        conversation = self.conversation
        if conversation is None:
            self._chat.clear()
            return
        try:
            removed = await self.state.services.conversations.clear(conversation.id)
        except USER_ERRORS as exc:
            notify(f"Could not clear: {describe_error(exc)}", "error")
            return
        self._chat.clear()
        self.state.recorded()
        notify(f"Cleared {removed} turn(s); the calls stay in the record.", "info")

    # --- answering -------------------------------------------------------------------------

    async def _respond(self, contents, _user, instance) -> AsyncIterator[str]:
        """Stream the answer to a user message through InferenceService, stored like send()."""
        text = contents if isinstance(contents, str) else str(contents or "")
        if not text.strip():
            notify("The message is empty.", "warning")
            return
        self._busy(True)
        try:
            async for chunk in self._answer(text, instance):
                yield chunk
        finally:
            self._busy(False)

    def _busy(self, busy: bool) -> None:
        """While an answer streams, the conversation cannot be switched or cleared."""
        for widget in (self._new, self._stored, self._clear):
            widget.disabled = busy

    async def _answer(self, text: str, instance) -> AsyncIterator[str]:
        try:
            conversation = await self._ensure_conversation()
            history = await self.state.services.conversations.history(conversation.id)
        except USER_ERRORS as exc:
            reason = describe_error(exc)
            notify(reason, "error")
            instance.callback_user = "error"
            yield f"Not sent: {reason}"
            return
        # A message's user name is rendered as HTML by Panel: escape it.
        instance.callback_user = escape(assistant_name(conversation))
        answer = ""
        result: RunResult | None = None
        try:
            # Same call, group and role as ConversationService.send(), but streamed, so the
            # history reads back identically after a restart.
            async for item in self.state.services.inference.stream(
                [*history, {"role": "user", "content": text}],
                provider=conversation.provider,
                model=conversation.model,
                group_id=conversation.id,
                role="turn",
                metadata={"conversation_id": conversation.id},
            ):
                if isinstance(item, RunResult):
                    result = item
                else:
                    answer += item
                    yield answer
        except USER_ERRORS as exc:
            reason = describe_error(exc)
            notify(reason, "error")
            yield (answer + "\n\n" if answer else "") + f"[failed: {reason}]"
            return
        finally:
            self.state.recorded()
        if result is None or not result.ok:
            reason = describe_error(result.error) if result and result.error else "no answer"
            notify(f"The answer failed: {reason}", "error")
            yield (answer + "\n\n" if answer else "") + f"[failed: {reason}; not kept in history]"
        elif result.response is not None and result.response.text != answer:
            yield result.response.text

    async def _on_callback_error(self, exc: BaseException, instance) -> None:
        log.exception("chat callback failed", exc_info=exc)
        reason = describe_error(exc)
        notify(reason, "error")
        instance.send(f"[error: {reason}]", user="error", respond=False)

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown("### Chat"),
            pn.Row(self._picker, self._new),
            self._system,
            pn.Row(self._stored, self._clear),
            self._info,
            self._chat_box,
            sizing_mode="stretch_width",
        )
