"""CSV and Parquet download buttons for any table: the file is built when a person clicks.

```python
download_buttons(lambda: self._frame, "recent-calls")            # a frame already shown
download_buttons(partial(state.read, study.compare, filters), "compare")  # async: off the loop
```
`frame_fn` takes no arguments and returns a DataFrame, or an awaitable of one (use an
async function for database work, so the server's event loop never waits on it).
Encoding (`study_query_llm.export`: CSV with a BOM, Parquet keeping column types) runs
off the loop too. Failures become a notification, never a traceback.

CSS classes (for UI tests): `sqllm-export` on the row, `sqllm-export-csv` and
`sqllm-export-parquet` on the buttons.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pandas as pd
import panel as pn

from study_query_llm.export import csv_bytes, parquet_bytes

from .state import describe_error, notify

log = logging.getLogger(__name__)

FrameFn = Callable[[], "pd.DataFrame | Awaitable[pd.DataFrame]"]
FORMATS = ("csv", "parquet")
_ENCODERS = {"csv": csv_bytes, "parquet": parquet_bytes}


def _safe_basename(basename: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", basename).strip("-.") or "export"


class FrameDownload(pn.widgets.FileDownload):
    """A FileDownload whose async callback may fail quietly (a notification, no file).

    Panel's own FileDownload would log the exception and leave the button spinning;
    here a failed build tells the person why and the button stays usable.
    """

    async def _async_sync_data(self):
        try:
            fileobj = await self.callback()
        except Exception as exc:  # shown to the person as one line, logged in full
            log.warning("export failed: %s", exc, exc_info=True)
            notify(f"Export failed: {describe_error(exc)}", "error")  # notify escapes
            return
        if fileobj is None:
            return
        self._sync_data(fileobj)


def download_button(frame_fn: FrameFn, basename: str, fmt: str) -> FrameDownload:
    """One download button building a `fmt` ("csv" or "parquet") file on click."""
    if fmt not in _ENCODERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    name = _safe_basename(basename)
    button = FrameDownload(
        label=f"Download {fmt.upper() if fmt == 'csv' else 'Parquet'}",
        filename=f"{name}.{fmt}",
        button_type="default",
        width=150,
        css_classes=[f"sqllm-export-{fmt}"],
    )

    async def build() -> io.BytesIO | None:
        frame = frame_fn()
        if inspect.isawaitable(frame):
            frame = await frame
        if frame is None or not isinstance(frame, pd.DataFrame):
            notify("Nothing to export yet.", "warning")
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        button.filename = f"{name}-{stamp}.{fmt}"
        return io.BytesIO(await asyncio.to_thread(_ENCODERS[fmt], frame))

    button.callback = build
    return button


def download_buttons(frame_fn: FrameFn, basename: str) -> pn.Row:
    """CSV and Parquet download buttons for the frame `frame_fn` returns when clicked."""
    return pn.Row(
        *(download_button(frame_fn, basename, fmt) for fmt in FORMATS),
        css_classes=["sqllm-export"],
        margin=(0, 5),
    )
