"""Keep glibc from unmapping and re-mapping large tensor buffers on every call.

glibc serves big allocations with mmap and gives them back on free, so a benchmark loop that allocates the
same large activations every iteration pays page faults each time (up to 30% at 16k tokens on these
machines). mallopt() changes that inside the running process, as the MALLOC_*_ environment variables would
at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_applied: dict = {}


def tune_glibc_malloc(trim_threshold_bytes: int = (1 << 31) - 1) -> bool:
    """Serve every allocation from the heap and keep freed memory (Linux with glibc only).

    M_MMAP_THRESHOLD is capped at 32 MiB by glibc, below the activations of a large layer, so mmap is
    switched off instead (M_MMAP_MAX = 0) and the trim threshold raised. Returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = {"M_MMAP_MAX": (_M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, trim_threshold_bytes),
                "M_TOP_PAD": (_M_TOP_PAD, 64 << 20)}
    ok = all(mallopt(opt, value) == 1 for opt, value in settings.values())
    if ok:
        _applied.update({f"mallopt_{name}": value for name, (_, value) in settings.items()})
    return ok


def applied_settings() -> dict:
    return dict(_applied)
