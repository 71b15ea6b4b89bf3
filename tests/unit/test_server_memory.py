"""The dashboard server's malloc settings (glibc): fewer arenas, a fixed mmap threshold."""

from __future__ import annotations

import platform

from panel_app.server import tune_malloc


def test_malloc_is_tuned_where_the_c_library_is_glibc():
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
