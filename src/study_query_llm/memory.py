"""Handing memory that Python has freed back to the operating system (glibc).

glibc keeps freed heap memory in its arenas for reuse, so a process's resident size stays
at its peak after a big read (the rollup cache's first read of millions of latencies frees
tens of MiB of temporary rows and arrays). `trim()` asks glibc to return what is free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return free heap memory to the operating system; False where that is not possible
    (a C library without `malloc_trim`). Costs a walk of the heap: call it after big reads,
    not on every query."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


_trimming = threading.Lock()


def trim_in_background() -> None:
    """`trim()` in a daemon thread, unless one is running already (callers on an event
    loop must not wait for the heap walk)."""
    if not _trimming.acquire(blocking=False):
        return

    def run() -> None:
        try:
            trim()
        finally:
            _trimming.release()

    threading.Thread(target=run, name="malloc-trim", daemon=True).start()
