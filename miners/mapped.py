"""Memory-mapped scratch arrays for whole-pool work that would not fit in RAM.

:func:`mapped_array` gives a float32 array backed by an unlinked temporary file (the map
keeps it alive until the array is freed), registered with one :class:`_PageReleaser`, which
hands the pages read or written back to the page cache whenever the process's file-backed
RSS passes ``POOL_MAPPED_BUDGET_BYTES``: a 10M x 384 pool (15 GB) then costs the server page
cache, not resident memory.
:func:`release_pages_of` registers any other memory-mapped array.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
import weakref
from typing import Any

import numpy as np

from indexing.settings import MEMMAP_ABOVE_BYTES, POOL_MAPPED_BUDGET_BYTES

__all__ = ["float32_array", "mapped_array", "release_pages_of"]


def _file_rss_bytes() -> int:
    """Resident bytes of this process's file-backed (and shared) pages (``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[2]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _PageReleaser:
    """Keeps the resident pages of registered memory maps under ``budget`` bytes: every
    ``period`` seconds one daemon thread (running while any map is registered) reads the
    process's file-backed RSS and, above the budget, hands every registered map's pages
    back to the page cache (``madvise(MADV_DONTNEED)`` on the whole map).

    Why: every page of a file map that the process has touched counts in its RSS until it is
    unmapped — a 10M x 384 pool's 15 GB file, read whole by the loading pass and again by
    each sweep of the graph or a diversity pick, put the server at 22.8 GiB of RSS with 8.7 GiB
    of its own (anonymous) memory. The kernel could reclaim those pages, but the RSS is what
    the OOM killer ranks processes by and what a container's monitoring shows. Dropping the
    process's mappings of them leaves the data in the page cache (the maps are shared maps
    of a file: a later read refaults the same cached page, 16 at a time; writes already made
    stay in the cached pages). Why a budget rather than a release at every tick: the cost
    is in the pages unmapped and faulted again, not in the calls (a refault sweep of 2 GB took
    0.17 s against 0.15 s mapped, the unmapping 0.03 s, here), so pages under the budget are
    left mapped; and a tick, not a budget alone, because a sweep maps gigabytes a second
    (BADGE at 10M: up to 10.8 GB of file RSS in 1 s samples taken 1.5 s apart with a 0.5 s
    tick and no budget). Maps are held by weak reference: a pool freed is forgotten."""

    def __init__(self, budget: int, period: float = 0.1) -> None:
        self.budget, self.period = budget, period
        self._maps: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.releases = 0

    def register(self, mapping: mmap.mmap) -> None:
        if self.budget <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        with self._lock:
            self._maps.add(mapping)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="assay-page-release", daemon=True)
                self._thread.start()

    def release_now(self) -> int:
        """Hand back the pages of every registered map now; the number of maps."""
        with self._lock:
            maps = list(self._maps)
        for mapping in maps:
            try:
                mapping.madvise(mmap.MADV_DONTNEED)
            except (ValueError, OSError):  # closed meanwhile
                self._maps.discard(mapping)
        self.releases += 1
        return len(maps)

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            if _file_rss_bytes() > self.budget:
                self.release_now()
            with self._lock:
                if not self._maps:
                    self._thread = None
                    return


_page_releaser = _PageReleaser(POOL_MAPPED_BUDGET_BYTES)


def release_pages_of(vectors: np.ndarray) -> bool:
    """Register the memory map behind ``vectors`` (a ``np.memmap`` or a view of one) with the
    page releaser (:class:`_PageReleaser`); False when it is not memory-mapped."""
    base: Any = vectors
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None:
        return False
    _page_releaser.register(base)
    return True


def mapped_array(shape: tuple[int, int], *, prefix: str = "assay-") -> np.memmap:
    """A ``float32`` array of ``shape`` on an unlinked file in the system temp folder,
    its pages handed back to the page cache while it lives (:func:`release_pages_of`)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    finally:
        os.unlink(path)  # the map keeps the file alive until it is released
    release_pages_of(out)
    return out


def float32_array(shape: tuple[int, int], *, prefix: str = "assay-") -> np.ndarray:
    """An uninitialised ``float32`` array of ``shape``: in RAM up to ``MEMMAP_ABOVE_BYTES``,
    above it :func:`mapped_array` (a 10M x 384 pool is 15 GB)."""
    if 4 * shape[0] * shape[1] > MEMMAP_ABOVE_BYTES:
        return mapped_array(shape, prefix=prefix)
    return np.empty(shape, dtype=np.float32)
