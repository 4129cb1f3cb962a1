"""How many threads the kernels use, and how those threads wait. Light: no numba, no numpy.

The default is llama.cpp's (common/common.cpp, cpu_get_num_math -> cpu_get_num_physical_cores):
the physical cores (one per set of hyperthread siblings), or, where those cannot be counted, all
logical cores up to 4 and half of them above that; never more than this process's CPU affinity
allows. `-t/--threads` (CLI) or `threads=` (edgemoe.load) set it; EDGEMOE_THREADS is the fallback.

The kernels run under numba's OpenMP layer (GNU libgomp), whose threads spin a while at each
barrier before they sleep (GOMP_SPINCOUNT). A fork-join per small matmul beside another busy
process then costs a scheduler time slice, not the matmul's share (issue 17 measured 70x slower
decoding on the bundled model beside other work): products too small to gain from a second thread
run on the calling thread alone (kernels.PARALLEL_MIN_BYTES). libgomp's wait policy is left at its
default: OMP_WAIT_POLICY=passive (sleep at once) made every larger fork-join wait for a futex
wake-up, 2.5x slower for a 1 MiB Q4_K product at T=1 with 2 threads on a quiet 2-core VM (133 us
against 53 us) and no faster beside a busy core (104 against 113 us); see docs/benchmarks.md.
"""

from __future__ import annotations

import os

from ..errors import EdgeMoEError


def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """llama.cpp's default thread count (see the module docstring), within the affinity mask."""
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil missing or the count unreadable: llama.cpp's fallback
        physical = None
    if not physical:
        logical = os.cpu_count() or 4
        physical = logical if logical <= 4 else logical // 2
    return max(1, min(physical, available_cpus()))


def parse_threads(value: object, what: str = "threads") -> int:
    """A thread count given by a user (an int, or a string from the CLI or the environment):
    a positive integer, or an EdgeMoEError naming `what` and the value."""
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    else:
        try:
            n = int(str(value).strip())
        except ValueError:
            n = None
    if n is None or n < 1:
        raise EdgeMoEError(f"{what} must be a positive integer, got {value!r}")
    return n


def env_threads() -> int:
    """EDGEMOE_THREADS when set (checked), else default_threads()."""
    raw = os.environ.get("EDGEMOE_THREADS", "").strip()
    return parse_threads(raw, "EDGEMOE_THREADS") if raw else default_threads()


def parallel_min_bytes(default: int) -> int:
    """EDGEMOE_PARALLEL_MIN_BYTES when set (checked: a byte count >= 0), else default."""
    raw = os.environ.get("EDGEMOE_PARALLEL_MIN_BYTES", "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise EdgeMoEError(f"EDGEMOE_PARALLEL_MIN_BYTES must be a byte count >= 0, got {raw!r}")
    return n
