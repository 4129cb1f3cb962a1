"""Emulate a smaller device on Linux (root, cgroup v1): memory cap, read throttle, readahead,
cold page cache. Used by the benchmarks to run llama.cpp and edgemoe side by side under the
same limits."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import EdgeMoEError

CGROOT = Path("/sys/fs/cgroup")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise EdgeMoEError(
            f"cannot write {value!r} to {path}: {exc.strerror} (device emulation needs root "
            f"and cgroup v1 memory/blkio controllers)"
        ) from None


def block_device_of(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(MAJOR:MINOR, sysfs name) of the whole disk holding path."""
    dev = os.stat(path).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    sys_dev = Path(f"/sys/dev/block/{majmin}")
    if not sys_dev.exists():
        raise EdgeMoEError(f"{path}: its block device {majmin} is not in /sys/dev/block")
    real = sys_dev.resolve()
    if (real / "partition").exists():  # a partition: throttle and readahead act on the disk
        real = real.parent
    return (real / "dev").read_text().strip(), real.name


def drop_caches() -> None:
    os.sync()
    _write(Path("/proc/sys/vm/drop_caches"), "3")


@contextlib.contextmanager
def readahead(disk: str, kb: int | None) -> Iterator[None]:
    """Set the disk's read_ahead_kb for the run, restoring it after."""
    if kb is None:
        yield
        return
    path = Path(f"/sys/block/{disk}/queue/read_ahead_kb")
    old = path.read_text().strip()
    _write(path, str(kb))
    try:
        yield
    finally:
        _write(path, old)


@contextlib.contextmanager
def limits(
    mem_bytes: int | None = None, read_bps: int | None = None, device: str | None = None
) -> Iterator[list[Path]]:
    """Create memory and blkio cgroups; yields the cgroup dirs whose cgroup.procs a child joins."""
    name = f"edgemoe-{uuid.uuid4().hex[:8]}"
    made: list[Path] = []
    try:
        if mem_bytes is not None:
            d = CGROOT / "memory" / name
            try:
                d.mkdir()
            except OSError as exc:
                raise EdgeMoEError(f"cannot create memory cgroup {d}: {exc.strerror}") from None
            made.append(d)
            _write(d / "memory.limit_in_bytes", str(int(mem_bytes)))
            with contextlib.suppress(OSError):  # no swap here; where there is, forbid it too
                (d / "memory.memsw.limit_in_bytes").write_text(str(int(mem_bytes)))
        if read_bps is not None:
            if device is None:
                raise EdgeMoEError("a read throttle needs the block device (MAJOR:MINOR)")
            d = CGROOT / "blkio" / name
            try:
                d.mkdir()
            except OSError as exc:
                raise EdgeMoEError(f"cannot create blkio cgroup {d}: {exc.strerror}") from None
            made.append(d)
            _write(d / "blkio.throttle.read_bps_device", f"{device} {int(read_bps)}")
        yield made
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()


def run_in(cgroups: list[Path], cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run cmd with its process placed in the cgroups before it execs."""

    def join() -> None:
        for d in cgroups:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.run(cmd, preexec_fn=join if cgroups else None, **kwargs)


def oom_killed(cgroups: list[Path]) -> bool:
    for d in cgroups:
        f = d / "memory.oom_control"
        if f.exists() and "oom_kill 0" not in f.read_text() and "oom_kill " in f.read_text():
            return True
    return False
