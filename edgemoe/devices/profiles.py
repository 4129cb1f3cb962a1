"""Device profiles (profiles/*.yaml): what a device has, for emulation, budgets and predictions.

    name: raspberry-pi-5-8gb-nvme        # file stem
    description: Raspberry Pi 5 8 GB with an NVMe SSD on the PCIe 2.0 x1 HAT
    ram: 8GiB
    default_budget: 5GiB                 # what edgemoe uses there without --budget
    cores: 4
    memory_bandwidth_gbps: 17.0          # GB/s, measured streaming reads
    storage:
      kind: nvme                         # nvme | microsd | emmc | ufs | sata
      seq_read_mbps: 800                 # MB/s, cold sequential reads
      rand_read_mbps: 400                # MB/s, cold random reads of 1 MiB
      read_latency_us: 90                # one 4 KiB random read
      readahead_kb: 128

Every figure carries a comment naming its source. Sizes take the same strings as --budget.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..errors import EdgeMoEError
from ..runtime.memory import parse_size

STORAGE_KINDS = ("nvme", "microsd", "emmc", "ufs", "sata", "virtio")


@dataclass(frozen=True)
class Storage:
    kind: str
    seq_read_mbps: float
    rand_read_mbps: float
    read_latency_us: float
    readahead_kb: int


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    ram: int
    default_budget: int
    cores: int
    memory_bandwidth_gbps: float
    storage: Storage

    def to_yaml_dict(self) -> dict:
        return asdict(self)


def profiles_dir() -> Path:
    """edgemoe/device_profiles/ when installed, profiles/ in a checkout."""
    pkg = Path(__file__).resolve().parents[1]  # edgemoe/
    return pkg / "device_profiles" if (pkg / "device_profiles").is_dir() else pkg.parent / "profiles"


def available() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """A profile by name (profiles/NAME.yaml) or by path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = profiles_dir() / f"{name_or_path}.yaml"
    if not p.is_file():
        raise EdgeMoEError(f"{name_or_path}: no such profile (available: {', '.join(available()) or 'none'})")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise EdgeMoEError(f"{p}: not a readable YAML profile ({exc})") from None
    return parse_profile(raw, p)


def parse_profile(raw: object, where: Path | str = "profile") -> Profile:
    def need(d: dict, key: str, kind, ctx: str):
        if not isinstance(d, dict) or key not in d:
            raise EdgeMoEError(f"{where}: {ctx}{key} is missing")
        v = d[key]
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
        if kind is int and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        if kind is str and isinstance(v, str) and v:
            return v
        if kind == "size":
            return parse_size(v, f"{where}: {ctx}{key}")
        raise EdgeMoEError(f"{where}: {ctx}{key} has a bad value {v!r}")

    s = raw.get("storage") if isinstance(raw, dict) else None
    kind = need(s, "kind", str, "storage.")
    if kind not in STORAGE_KINDS:
        raise EdgeMoEError(f"{where}: storage.kind {kind!r} is not one of {', '.join(STORAGE_KINDS)}")
    storage = Storage(
        kind,
        need(s, "seq_read_mbps", float, "storage."),
        need(s, "rand_read_mbps", float, "storage."),
        need(s, "read_latency_us", float, "storage."),
        need(s, "readahead_kb", int, "storage."),
    )
    prof = Profile(
        name=need(raw, "name", str, ""),
        description=need(raw, "description", str, ""),
        ram=need(raw, "ram", "size", ""),
        default_budget=need(raw, "default_budget", "size", ""),
        cores=need(raw, "cores", int, ""),
        memory_bandwidth_gbps=need(raw, "memory_bandwidth_gbps", float, ""),
        storage=storage,
    )
    if prof.default_budget > prof.ram:
        raise EdgeMoEError(f"{where}: default_budget is larger than ram")
    return prof
