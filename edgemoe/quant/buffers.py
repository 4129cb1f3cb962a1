"""numpy arrays as C code wants them: the data's address, 64-byte alignment; anonymous-mmap
buffers (alloc) whose memory goes back to the OS when they are dropped; and paged zeros (paged)
whose memory is taken a page at a time as they are written and can be given back.
(ggml's CPU buffers must start on a 32-byte boundary; ggml aborts the process otherwise.)"""

from __future__ import annotations

import mmap

import numpy as np


def addr(a: np.ndarray) -> int:
    """The address of a's data."""
    return int(a.__array_interface__["data"][0])


def aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """a as a C-contiguous array whose data starts on an `align`-byte boundary (ggml's CPU buffers
    want 32); a itself when it already is one."""
    a = np.asarray(a)
    if a.flags.c_contiguous and addr(a) % align == 0:
        return a
    buf = np.empty(a.nbytes + align, dtype=np.uint8)
    off = -addr(buf) % align
    out = buf[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


# every page of an alloc() buffer is written soon after (planes read into it, blocks merged into
# it): faulting them all in one call costs a third of faulting them one by one on first write
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def alloc(nbytes: int) -> np.ndarray:
    """A uint8 buffer in an anonymous mmap of its own, its pages already mapped: freed, they go
    back to the OS at once (malloc arenas would keep them, and RSS would drift above a budget)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), flags=flags), dtype=np.uint8)[:nbytes]


def paged(shape: tuple[int, ...], dtype) -> tuple[np.ndarray, mmap.mmap]:
    """Zeros in an anonymous mmap of their own, page-aligned, without transparent huge pages (so
    writing a byte costs one base page, mmap.PAGESIZE, wherever THP is on): the array and its
    mapping, whose madvise(MADV_DONTNEED) gives the pages back (they read as zeros again)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    m = mmap.mmap(-1, max(n, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype=np.uint8)[:n].view(dtype).reshape(shape), m


def pages_of(starts: np.ndarray, length: int) -> int:
    """Distinct pages (mmap.PAGESIZE) that the byte ranges [start, start + length) touch; starts
    ascending, ranges not overlapping."""
    if length <= 0 or len(starts) == 0:
        return 0
    first = starts // mmap.PAGESIZE
    last = (starts + length - 1) // mmap.PAGESIZE
    return int((last - first + 1).sum() - np.count_nonzero(first[1:] == last[:-1]))
