"""glibc malloc settings for processes that handle chunk-sized buffers.

glibc's malloc gives every buffer above its mmap threshold (adjusted between 128 KiB and
32 MiB) a fresh mapping and returns freed memory past its trim threshold to the system, so
each decompressed chunk, each staged image block and each tensor copy of a chunk
page-faulted fresh memory. Measured (benchmarks/RESULTS.md): a quarter of a ``tf_dataset``
pipeline's CPU time, and 8-18 % of a build's wall time. With the two thresholds below,
chunk-sized buffers are reused from the heap; either alone did not help.

No Dask here: ``tf_dataset`` tunes the reader's process with it; builds register
``hepdask.workers.TunedMalloc`` so that every worker calls :func:`tune`.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def tune() -> bool:
    """Set this process's mmap and trim thresholds (process-wide: freed memory up to
    ``TRIM_THRESHOLD`` stays with the process). True when applied; False where the C library
    is not glibc, which is then left as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

