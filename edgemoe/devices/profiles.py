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
`--profile` takes a YAML path or a name, found as NAME.yaml in search_dirs(): the current
directory, ./profiles, the user's profiles (user_dir(), where `edgemoe profile` writes), the
shipped ones (profiles_dir()).
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
    """The shipped profiles: edgemoe/device_profiles/ when installed, profiles/ in a checkout."""
    pkg = Path(__file__).resolve().parents[1]  # edgemoe/
    return pkg / "device_profiles" if (pkg / "device_profiles").is_dir() else pkg.parent / "profiles"


def user_dir() -> Path:
    """The user's profiles, where `edgemoe profile` writes: $XDG_CONFIG_HOME/edgemoe/profiles, else
    ~/.config/edgemoe/profiles (an installed package's directory is not the user's to write)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".config") / "edgemoe" / "profiles"


def search_dirs() -> list[Path]:
    """Where a profile NAME is looked for, in order: ./NAME.yaml, ./profiles/NAME.yaml, the user's
    profiles (user_dir), the shipped ones (profiles_dir)."""
    out: list[Path] = []
    for d in (Path("."), Path("profiles"), user_dir(), profiles_dir()):
        if not any(_same_dir(d, o) for o in out):
            out.append(d)
    return out


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def shown(p: Path) -> str:
    """A path as messages show it: ./NAME.yaml for one in the current directory."""
    return str(p) if p.is_absolute() or str(p) == "." else f".{os.sep}{p}"


def looks_like_path(s: str) -> bool:
    """--profile names a file (rather than a profile name) when it has a directory part or a YAML suffix."""
    return "/" in s or os.sep in s or s.startswith("~") or s.endswith((".yaml", ".yml"))


def find_profile(name: str) -> Path | None:
    """The file a profile name means (the first NAME.yaml in search_dirs), or None."""
    for d in search_dirs():
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    return None


def available() -> list[str]:
    """Every profile name search_dirs holds (the stems of their *.yaml files)."""
    return sorted({p.stem for d in search_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """A profile by path (when it looks like one: looks_like_path) or by name (find_profile)."""
    s = os.fspath(name_or_path)
    if not s:
        raise EdgeMoEError("--profile: empty (a profile name or a YAML path)")
    if looks_like_path(s):
        p = Path(s).expanduser()
        if not p.exists():
            raise EdgeMoEError(f"{s}: no such profile file")
        return read_profile(p)
    p = find_profile(s)
    if p is None:
        where = ", ".join(shown(d / f"{s}.yaml") for d in search_dirs())
        raise EdgeMoEError(f"{s}: no such profile (looked for {where}; known: {', '.join(available()) or 'none'})")
    return read_profile(p)


def read_profile(p: Path) -> Profile:
    """The profile in file p; a file that is not one is "P: not a valid profile (what is wrong)"."""
    if p.is_dir():
        raise EdgeMoEError(f"{p}: not a valid profile (a directory, not a YAML file)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeMoEError(f"{p}: not a valid profile (not UTF-8 text)") from None
    except OSError as exc:
        raise EdgeMoEError(f"{p}: cannot read the profile ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeMoEError(f"{p}: not a valid profile (not YAML: {first})") from None
    try:
        return _parse(raw)
    except _Invalid as exc:
        raise EdgeMoEError(f"{p}: not a valid profile ({exc})") from None


class _Invalid(ValueError):
    """What is wrong with a profile mapping (without the file's name)."""


def parse_profile(raw: object, where: Path | str = "profile") -> Profile:
    """A profile from its YAML mapping; what is wrong is "WHERE: ..."."""
    try:
        return _parse(raw)
    except _Invalid as exc:
        raise EdgeMoEError(f"{where}: {exc}") from None


def _parse(raw: object) -> Profile:
    if not isinstance(raw, dict):
        kind = {str: "a string", list: "a list", type(None): "empty"}.get(type(raw), type(raw).__name__)
        raise _Invalid(f"its YAML is {kind}, not a mapping with the keys {', '.join(_KEYS)}")

    def need(d: dict, key: str, kind, ctx: str):
        if not isinstance(d, dict) or key not in d:
            raise _Invalid(f"{ctx}{key} is missing")
        v = d[key]
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
        if kind is int and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        if kind is str and isinstance(v, str) and v:
            return v
        if kind == "size":
            try:
                return parse_size(v, f"{ctx}{key}")
            except EdgeMoEError as exc:
                raise _Invalid(str(exc)) from None
        raise _Invalid(f"{ctx}{key} has a bad value {v!r}")

    s = raw.get("storage")
    kind = need(s, "kind", str, "storage.")
    if kind not in STORAGE_KINDS:
        raise _Invalid(f"storage.kind {kind!r} is not one of {', '.join(STORAGE_KINDS)}")
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
        raise _Invalid("default_budget is larger than ram")
    return prof


_KEYS = ("name", "description", "ram", "default_budget", "cores", "memory_bandwidth_gbps", "storage")
