"""glibc's allocator statistics (mallinfo2), for tests of quant.methods.base.reused_heap."""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_mallinfo() -> Callable[[], MallInfo2] | None:
    """``mallinfo2`` of this process's glibc (``hblkhd``: bytes in mmapped blocks), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2
