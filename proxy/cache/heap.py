"""Warm the worker's heap at start-up, so the memory tier's first frames do not wait on page faults.

Every byte the memory tier keeps lives in memory the process asked the kernel for, and memory the
process has never touched costs a page fault per 4 KiB at first write. On the 2-core KVM machine of
benchmarks/RESULTS.md that is ~4 µs a page: ~100 ms of the event loop's CPU for a 105 MB CT series,
paid while the study's first viewer waits (26,600 faults in a ~370 ms cold viewer, perf). A worker
that has run for a while reuses memory it freed; a new one has none to reuse.

So a worker with a frame cache touches `nbytes` of heap before it serves anything, and hands it
back to the allocator told to keep it: glibc's M_TRIM_THRESHOLD above it (freed memory stays in the
process), and M_MMAP_THRESHOLD at BUFFER_LIMIT, so that buffers up to that size (an instance received
whole, parts.py; the archive connections' receive buffers, transport.py) come from the warm heap instead
of fresh mmaps. The
JVM's AlwaysPreTouch does the same for its heap. The price is start-up time (~1 ms of CPU per MiB
here) and resident memory from the start rather than after the first studies.

glibc only (mallopt); with another C library, or none found, nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

log = logging.getLogger("dicomweb_edge")

BUFFER_LIMIT = 4 * 1024 * 1024  # buffers up to this size come from the heap, larger ones from mmap
CHUNK = 2 * 1024 * 1024  # touched a chunk at a time; below BUFFER_LIMIT, so from the heap
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc with malloc, memset, free and mallopt typed, or None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)  # the symbols the interpreter is linked with: its C library's allocator
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.memset.restype = ctypes.c_void_p
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        libc.free.restype = None
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mallopt.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, ValueError, AttributeError):  # no confstr name, no such symbol: not glibc
        return None
    return libc


def warm(nbytes: int) -> int:
    """Touch `nbytes` of heap and keep it for this process's buffers; the bytes warmed (0: not done).

    Call it in the thread that allocates the buffers (the event loop's): glibc gives each thread
    its own arena, and only the calling thread's is warmed."""
    if nbytes <= 0:
        return 0
    libc = _glibc()
    if libc is None:
        return 0
    if not (libc.mallopt(_M_MMAP_THRESHOLD, BUFFER_LIMIT)
            and libc.mallopt(_M_TRIM_THRESHOLD, min(nbytes + 4 * BUFFER_LIMIT, 2**31 - 1))):
        return 0
    started = time.perf_counter()
    chunks: list[int] = []
    try:
        for _ in range(-(-nbytes // CHUNK)):
            p = libc.malloc(CHUNK)
            if not p:
                break
            libc.memset(p, 0, CHUNK)
            chunks.append(p)
    finally:
        for p in reversed(chunks):
            libc.free(p)
    warmed = len(chunks) * CHUNK
    log.info("warmed %d MiB of heap for the memory tier in %.0f ms", warmed >> 20,
             (time.perf_counter() - started) * 1000)
    return warmed
