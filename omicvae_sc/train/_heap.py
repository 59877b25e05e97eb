"""Keep freed memory in the process between training steps (glibc's malloc).

A training step allocates and frees tens of megabytes of ``(batch, genes)`` tensors. With
glibc's default settings that memory goes back to the operating system at the end of every
step (large blocks are unmapped, and the top of the heap is trimmed once more than a few
megabytes are free there), and the next step takes it back one 4 KiB page fault at a time:
2,100 to 4,000 faults and 6 to 11 ms of kernel CPU time per batch-512 step on pbmc3k in a
process's first training; without them the step took 0.79x to 0.93x as long (medians of two
runs of ``benchmarks/page_faults.py``). :func:`steady_heap` sets the two thresholds to the values
glibc's own adaptive rule may reach by itself (blocks up to 32 MiB served from the heap, up to
64 MiB kept free at its top), and hands the free memory back with ``malloc_trim`` when training
ends. Elsewhere (macOS, Windows, musl) it does nothing. ``OMICVAE_SC_TUNE_MALLOC=0`` turns it
off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Blocks up to this size come from the heap (glibc's ceiling for its adaptive threshold)."""
TRIM_THRESHOLD = 64 * 2**20
"""Free memory kept at the top of the heap (twice the block size, as glibc's rule sets it)."""


def _glibc():
    """glibc's ``mallopt`` and ``malloc_trim``, or ``None`` where they are not the allocator."""
    if os.environ.get("OMICVAE_SC_TUNE_MALLOC", "1") == "0":
        return None
    return _glibc_library()


@functools.cache
def _glibc_library():
    """Found once per process: ``platform.libc_ver`` reads the Python executable."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


_depth = 0  # open steady_heap blocks: only the outermost hands memory back


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """Inside the block, freed memory stays in the process for the next step; on leaving the
    outermost block, the free memory goes back to the system. The thresholds stay set
    afterwards (a process's malloc has no way back to its adaptive defaults)."""
    global _depth
    libc = _glibc()
    if libc is not None and _depth == 0:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if libc is not None and _depth == 0:
            libc.malloc_trim(0)
