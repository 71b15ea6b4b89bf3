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


def test_one_background_trim_at_a_time():
    memory.trim_in_background()
    memory.trim_in_background()
    running = [t for t in threading.enumerate() if t.name == "malloc-trim"]
    assert len(running) <= 1
    for thread in running:
        thread.join()
    assert not memory._trimming.locked()
