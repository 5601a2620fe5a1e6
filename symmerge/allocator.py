"""The command line's memory allocator settings: keep freed large buffers for reuse (glibc only).

Aligning or merging a 7B model converts one matrix after another to float32 (180-500 MB temporaries at LLaMA-7B
widths). glibc's malloc serves every allocation above its mmap threshold (at most 32 MB when adjusted dynamically)
with a fresh ``mmap`` and returns it with ``munmap`` when freed, so each temporary's pages are faulted in and zeroed
by the kernel again: on the development machine, a fine-tune ``align`` of a 4-layer LLaMA-7B-width pair spent 10.2
of its 28.7 s in the kernel (``sys`` time); with the settings below, 3.1 of 21.8 s. A 20-fold float32 conversion of
one 4096 × 11008 bfloat16 matrix took 4.7 s (3.5 s sys) against 2.1 s.

Freed memory then stays in the process's heap for the next temporary instead of going back to the system: resident
anonymous memory stays at its high-water mark. Only the ``symmerge`` command sets this (:func:`keep_freed_buffers`
is called before torch is imported, the only time glibc honours it), never ``import symmerge``: a library must not
change its host process's allocator. Settings the user gave glibc (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``) win.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameters (glibc's malloc.h)."""
MMAP_THRESHOLD = 256 << 20
"""Allocations below this come from the heap: the float32 copies of LLaMA-7B's FFN (180 MB) and attention (67 MB)
matrices, made again for every layer. Larger ones — a layer's FFN similarity (11008² float32, 485 MB), the
bfloat16 features side by side (270 MB), a few per layer — still come from ``mmap`` and go back when freed: with
every allocation below 1 GB kept in the heap, a 7B ``merge -s all`` peaked at 6.1 GB of anonymous memory (2.1 GB
without), the heap's holes between buffers of different sizes growing layer by layer."""
TRIM_THRESHOLD = 256 << 20
"""Free memory at the top of the heap beyond this goes back to the system."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module's docstring); whether they were set.
    Nothing on other C libraries, or when the user configured glibc's malloc through its environment variables."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
