"""Memory sizes and measurements (psutil)."""

from __future__ import annotations

import re
import resource
import sys

import psutil

from ..errors import EdgeMoEError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: int | str, what: str = "memory budget") -> int:
    """An int of bytes or a string such as "1.5GiB", "800MB", "512M" -> bytes."""
    if isinstance(value, bool):
        raise EdgeMoEError(f"{what} must be a size such as 1.5GiB or 800MB, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise EdgeMoEError(f"{what} {value!r} is not a size such as 1.5GiB, 800MB or 2000000000")
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise EdgeMoEError(f"{what} must be an int of bytes or a string such as '1.5GiB', got {value!r}")
    if n <= 0:
        raise EdgeMoEError(f"{what} must be positive, got {value!r}")
    return n


def format_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def rss() -> int:
    return psutil.Process().memory_info().rss


def available() -> int:
    return psutil.virtual_memory().available


def peak_rss() -> int:
    """Peak RSS of this process so far: VmHWM on Linux (psutil has no peak figure). Not getrusage's
    ru_maxrss: Linux carries the peak of the process that forked across exec into it, so a worker
    started by a large parent would report the parent's peak. Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak if sys.platform == "darwin" else peak * 1024, rss())


def read_bytes() -> int:
    """Bytes this process has read from storage so far (Linux /proc/self/io read_bytes, by psutil);
    0 where the OS does not count them."""
    try:
        return psutil.Process().io_counters().read_bytes
    except (AttributeError, psutil.Error, OSError):
        return 0


# Blocks of this size or more get a mapping of their own, returned to the OS when freed.
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (mallopt M_MMAP_THRESHOLD). glibc raises it each
    time a mapped block is freed (up to 32 MiB); blocks below it come from the heap, which keeps
    its high-water mark: a soak's second prompt left ~2 MB more RSS for good (a 2 MB transient
    served from the heap), in a process whose memory is a budget. Fixed, every block of 1 MiB or
    more (expert planes, a batch's larger arrays) is unmapped when freed and RSS follows what is
    live. (At 128 KiB, glibc's default starting point, every attention-sized array became a fresh
    mapping and the test suite ran 2-3x slower; at 1 MiB the test files timed ran as fast as
    without.) True where it took effect (glibc); elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    return mallopt(-3, MMAP_THRESHOLD) == 1  # M_MMAP_THRESHOLD


MMAP_THRESHOLD_FIXED = fix_mmap_threshold()

# RSS right after `import edgemoe` (whose first import is this module): every memory figure of the
# runtime is counted from it
BASELINE_RSS = rss()
