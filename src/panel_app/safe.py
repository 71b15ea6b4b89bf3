"""Escaping for every piece of prompt or response text that reaches the page.

Text from prompts and responses is data, never markup: it is HTML-escaped before it is put
into Markdown/HTML panes or tooltips. Search snippets arrive with `[[`/`]]` hit markers from
the database; they are escaped first and only then turned into <mark> tags.
"""

from __future__ import annotations

import html

from study_query_llm.db.search import HIGHLIGHT_END, HIGHLIGHT_START

# Longest prompt, system prompt or template a text box accepts. Panel's default (5,000
# characters) would silently cut longer prompts; providers reject what is too long for them.
TEXT_MAX_CHARS = 2_000_000


def escape(text: object) -> str:
    """HTML-escape any value for an HTML or Markdown pane (quotes included)."""
    return html.escape("" if text is None else str(text), quote=True)


def escape_markdown(text: object) -> str:
    """Escape for a Markdown pane: Markdown punctuation neutralised, then HTML-escaped."""
    text = "" if text is None else str(text)
    for ch in ("\\", "`", "*", "_", "[", "]", "#", "|", "~", "!"):
        text = text.replace(ch, "\\" + ch)
    return escape(text)


def highlight(snippet: object) -> str:
    """An escaped snippet with its `[[hit]]` markers turned into <mark>hit</mark>."""
    escaped = escape(snippet)
    return escaped.replace(escape(HIGHLIGHT_START), "<mark>").replace(
        escape(HIGHLIGHT_END), "</mark>"
    )


def pre(text: object) -> str:
    """Escaped text in a <pre> block that keeps line breaks and wraps long lines."""
    return f'<pre class="sqllm-text">{escape(text)}</pre>'
