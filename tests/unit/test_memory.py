"""Handing freed heap memory back to the operating system (glibc's malloc_trim)."""

from __future__ import annotations

import platform
import resource
import threading

import numpy as np

from study_query_llm import memory

GLIBC = platform.libc_ver()[0] == "glibc"


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def test_trim_returns_memory_that_was_freed_but_kept():
    # 200 MiB in 8 KiB blocks (below the mmap threshold: they live in malloc's heap), then
    # all but every 100th freed: the survivors pin the heap's top, so malloc keeps the rest.
    blocks = [np.ones(1000) for _ in range(25_000)]
    kept = blocks[::100]
    del blocks
    before = _rss_mib()
    assert memory.trim() is GLIBC
    if GLIBC:
        assert before - _rss_mib() > 100
    assert len(kept) == 250


def _join_trims() -> None:
    for thread in threading.enumerate():
        if thread.name == "malloc-trim":
            thread.join()


def test_a_background_trim_is_skipped_while_one_runs(monkeypatch) -> None:
    done: list[str] = []
    monkeypatch.setattr(memory, "trim", lambda: done.append(threading.current_thread().name))
    with memory._trimming:  # as if a trim were under way
        memory.trim_in_background()
        _join_trims()
    assert done == []
    memory.trim_in_background()
    _join_trims()
    assert done == ["malloc-trim"]  # in its own thread, off the caller's
    assert not memory._trimming.locked()
