"""Keep freed memory for the next round instead of handing it back to the system.

Every exchange allocates and frees vectors the size of the adapter (encodings, masks,
frames). glibc returns large freed blocks to the kernel at once (mmap, heap trimming), so
the next exchange pays a page fault and a zeroed page for every 4 KiB it touches again:
on a shared 2-core machine that costs several times the arithmetic itself. Raising the
mmap and trim thresholds keeps those blocks in the process for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8
MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the reusable heap: an 8M-value adapter's float32 vector
(glibc's largest setting on 64-bit)."""
TRIM_THRESHOLD = 512 << 20
TOP_PAD = 64 << 20


def keep_freed_memory(one_arena: bool = False, large_blocks: bool = False) -> bool:
    """Tune glibc's allocator for this process; False (and nothing changed) elsewhere.
    `one_arena` (the simulator): every thread allocates from one heap. glibc otherwise gives
    each allocating thread a heap of its own that keeps what a freed training step held, so N
    peer threads would pin N steps' activations; one peer computes at a time, so one heap
    costs no contention and the next peer's step reuses what the last one freed.
    `large_blocks` (torchrun peers): blocks above glibc's largest mmap threshold (32 MiB: an
    adapter over 8M values) come from the heap too, so a 40M-value adapter's message buffers
    and mixed vector are reused, not mapped and faulted in afresh every exchange (measured:
    `make bench SUITE=exchange`, the 40M-value rows). A process of one peer frees and
    allocates the same sizes every round, so the heap does not fragment."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    options = [(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD),
               *([(_M_ARENA_MAX, 1)] if one_arena else []), *([(_M_MMAP_MAX, 0)] if large_blocks else [])]
    return all(mallopt(option, value) == 1 for option, value in options)
