"""EmbeddingsView (placeholder until the tab is built)."""

from __future__ import annotations

import panel as pn
import param

from ..state import AppState


class EmbeddingsView(pn.viewable.Viewer):
    """Placeholder."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")

    def __panel__(self):
        return pn.pane.Markdown("Coming soon.")
