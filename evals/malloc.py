"""Freed memory reused during an evaluation instead of fresh pages from the kernel (Linux, glibc).

A forward pass allocates and frees the same large tensors over and over (the bundled model at
4 x 512 tokens: a 12.6 MB MLP intermediate per layer, 8 MB head tiles, ...). glibc hands blocks over
its mmap threshold straight to the kernel and returns free memory at a heap's top as soon as it
exceeds the trim threshold, so every such tensor is new memory: a page fault and a zeroed 4 KiB page
per 4 KiB touched. Measured on this project's 2-core machine, 16 windows of 512 tokens: 0.7-1.8
million minor faults per evaluation; with the settings below 140,000-190,000, nearly all in each
worker thread's first batch (`evals.side_by_side`), and with those side-by-side batches 1.09-1.15x
the tokens per second (interleaved A/B in one process).

`reuse_freed_memory()` raises glibc's mmap threshold to its 32 MiB maximum, keeps free memory in
the heaps (trim threshold and top pad), and on leaving the last open block returns free memory to
the system (`malloc_trim`) and leaves glibc where its own rule would be. Nested and concurrent
blocks count: the settings hold while any is open. Setting a threshold by hand turns off glibc's
dynamic one for good, so the block leaves the state that rule reaches once a 32 MiB block is freed
(mmap threshold 32 MiB, trim threshold twice that, default top pad). Putting the trim threshold
back to glibc's 128 KiB start instead made later work in the process fault more: a plain
8-window evaluation loop (full logits) run after an evaluation took 0.96-1.46 million minor faults
(0.79-1.27 million in a fresh process), and 0.59-0.62 million with the state above; its time
moved within the machine's noise. No-op elsewhere (macOS, Windows, musl) and with
`FRANKENLAB_MALLOC_TUNING=0`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading

from frankenlab.evals import switched_off

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
KEEP_FREE = 1 << 30  # trim threshold while evaluating: free memory stays for the next batch
TOP_PAD = 64 << 20  # a per-thread heap grows (and keeps) room for a batch's tensors
AFTER_TRIM = 2 * MMAP_THRESHOLD  # glibc's dynamic rule: trim threshold = 2 x mmap threshold
DEFAULT_TOP_PAD = 128 << 10  # glibc's default

_lock = threading.Lock()
_open = 0


@functools.cache
def _glibc():
    """The C library if it is glibc (whose malloc these settings are for), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        _ = libc.gnu_get_libc_version  # glibc only: musl has mallopt as a stub
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def enabled() -> bool:
    return not switched_off("FRANKENLAB_MALLOC_TUNING") and _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory(on_cpu: bool = True):
    """Inside the block, freed tensors are reused by the next batch instead of faulted in anew.
    `on_cpu=False` (the model is on a GPU: its batches are not host memory) leaves glibc alone."""
    global _open
    if not on_cpu or not enabled():
        yield
        return
    libc = _glibc()
    with _lock:
        if _open == 0:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE)
            libc.mallopt(M_TOP_PAD, TOP_PAD)
        _open += 1
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0:
                libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM)
                libc.mallopt(M_TOP_PAD, DEFAULT_TOP_PAD)
                libc.malloc_trim(0)  # what the evaluation freed goes back to the system
