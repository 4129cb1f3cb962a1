"""Reading an expert store (its layout: store/format.py): StoreReader reads an expert's planes,
checks each plane against its checksum in the manifest, and keeps them out of the page cache:
large planes are read with O_DIRECT straight into buffers of their own (the whole pages around
each plane; no page-cache copy: 1.5x the rate of buffered reads on this project's build machine,
tools/bench_read.py), the rest with buffered reads whose page-cache copy is handed back."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from ..quant.buffers import alloc
from . import integrity
from .format import (  # noqa: F401 (the format's names, for the store's users)
    ALIGNMENT,
    DENSE,
    FORMAT_VERSION,
    MANIFEST,
    MATRICES,
    check_manifest,
    checksum,
    expert_shapes,
    expert_tensor_name,
    is_store,
    matrix_plane_bytes,
    scheme_of,
    shard_name,
)
from .integrity import sealed  # noqa: F401 (convert's)


def _opt(damage: str | None) -> list[str]:
    return [damage] if damage else []


@dataclass(frozen=True)
class ExpertLocation:
    shard: int  # layer index = shard file
    offset: int  # byte offset of plane 0 in the shard file
    plane_offsets: tuple[int, ...]  # P+1 cumulative offsets relative to `offset`
    checksums: tuple[int, ...]  # one per plane


PAGE = 4096  # O_DIRECT reads whole pages of the device into page-aligned buffers
# planes of at least this many bytes are read with O_DIRECT: their buffers then hold the pages
# around them, up to 2 x PAGE more than the plane (< 1.6% here), which the cache does not charge
DIRECT_MIN = 512 * 1024


class StoreReader:
    """Reads expert planes (read_new: into buffers of their own, O_DIRECT where it applies;
    read_planes: into the caller's buffers), checking every plane."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise EdgeMoEError(f"{self.root}: not an expert store (no {MANIFEST})") from None
        except (OSError, ValueError) as exc:
            raise EdgeMoEError(f"{mpath}: unreadable manifest ({exc})") from None
        # version, types, ranges and sizes before anything is allocated; the manifest's checksum
        lay = check_manifest(manifest, mpath)
        # the headers of dense.gguf (before it is parsed) and of the shards (integrity.py)
        integrity.raise_first(_opt(integrity.dense_header_damage(self.root, manifest)))
        integrity.raise_first(integrity.shards_damage(self.root, manifest, lay))
        try:
            self.manifest = manifest
            self.scheme_name: str = manifest["scheme"]["name"]
            scheme = scheme_of(manifest["scheme"])
            # per layer: the scheme its experts are in (None: no experts)
            self.schemes = scheme if isinstance(scheme, list) else [scheme if x else None for x in manifest["experts"]]
            first = next(s for s in self.schemes if s is not None)
            self.bits: tuple[int, ...] = tuple(first.widths)
            self.group: int = int(first.group)
            self.n_layer: int = int(manifest["n_layer"])
            self.n_expert: int = int(manifest["n_expert"])
            self.n_embd: int = int(manifest["n_embd"])
            self.n_ff_exp: int = int(manifest["n_ff_exp"])
            # per layer (None: no experts), per matrix, per plane: byte lengths (the same for every
            # expert of a layer)
            self.plane_bytes: tuple[dict[str, tuple[int, ...]] | None, ...] = lay.plane_bytes
            self.n_planes = lay.n_planes
            self.locations: list[list[ExpertLocation]] = [
                [
                    ExpertLocation(
                        layer,
                        int(e["offset"]),
                        tuple(int(o) for o in e["plane_offsets"]),
                        tuple(int(c) for c in e["checksums"]),
                    )
                    for e in manifest["experts"][layer]
                ]
                for layer in range(self.n_layer)
            ]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EdgeMoEError(f"{mpath}: manifest is missing or has a bad field ({exc!r})") from None
        self._fds: dict[int, int] = {}
        self._direct_fds: dict[int, int | None] = {}  # None: this filesystem has no O_DIRECT
        self.bytes_read = 0

    @property
    def dense_path(self) -> Path:
        return self.root / DENSE

    def load_dense(self, gf) -> None:
        """The model's dense.gguf (GGUFFile) into memory, all but a token embedding the output layer
        does not share (read by rows: embedding_on_disk), then check_dense."""
        from ..models.gguf_file import embedding_on_disk

        gf.load_into_memory(embedding_on_disk(gf))
        self.check_dense(gf)

    def check_dense(self, gf=None) -> None:
        """dense.gguf's tensors against their checksums and its configuration against the manifest
        (raises EdgeMoEError naming the file and tensor). gf: the model's GGUFFile after
        load_into_memory (its tensors are checked in memory); None: opened here, nothing copied."""
        own = gf is None
        gf = integrity.open_dense(self.dense_path) if own else gf
        try:
            integrity.raise_first(integrity.dense_damage(self.root, self.manifest, gf))
        finally:
            if own:
                gf.close()

    @property
    def native(self) -> bool:
        """Whether the experts are the source's own blocks (scheme "native")."""
        return self.scheme_name == "native"

    def moe_layers(self) -> list[int]:
        return [i for i, pb in enumerate(self.plane_bytes) if pb is not None]

    def plane_size(self, plane: int, layer: int) -> int:
        pb = self.plane_bytes[layer]
        return sum(pb[m][plane] for m in MATRICES)

    def plane_sizes(self, layer: int) -> list[int]:
        """The bytes of each plane of an expert of this layer ([] for a layer without experts)."""
        if self.plane_bytes[layer] is None:
            return []
        return [self.plane_size(p, layer) for p in range(self.n_planes)]

    def expert_bytes(self, n_planes: int, layer: int | None = None) -> int:
        """One expert's bytes at n_planes planes in this layer; layer None: the largest over the
        layers (what a budget must hold room for)."""
        if layer is None:
            return max(self.expert_bytes(n_planes, i) for i in self.moe_layers())
        return sum(self.plane_size(p, layer) for p in range(n_planes))

    def all_experts_bytes(self) -> int:
        """Every expert of every MoE layer at every plane."""
        return sum(len(self.locations[i]) * self.expert_bytes(self.n_planes, i) for i in self.moe_layers())

    def _fd(self, layer: int) -> int:
        fd = self._fds.get(layer)
        if fd is None:
            path = self.root / shard_name(layer)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise EdgeMoEError(f"{path}: cannot open expert shard ({exc.strerror})") from None
            # every read is a whole run of planes: readahead past it would only read bytes nobody
            # asked for (on the OLMoE-shaped bench model at a 40% budget, eMMC profile: 108.7 MB
            # read per decoded token with it, 94.9 without; docs/benchmarks.md)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[layer] = fd
        return fd

    def _direct_fd(self, layer: int) -> int | None:
        if layer not in self._direct_fds:
            fd = None
            if hasattr(os, "O_DIRECT"):  # Linux
                try:
                    fd = os.open(self.root / shard_name(layer), os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    fd = None
            self._direct_fds[layer] = fd
        return self._direct_fds[layer]

    def read_new(self, layer: int, expert: int, first: int, n: int) -> list[np.ndarray]:
        """Planes first .. first+n-1 of one expert, each in a buffer of its own (an anonymous
        mmap: freed with it), checked. A plane of DIRECT_MIN bytes or more is read with O_DIRECT
        where the filesystem takes it (the whole pages around it: its buffer is a view into them);
        the others, and every plane where O_DIRECT fails, as read_planes reads."""
        self._check_range(layer, expert, first, n)
        loc = self.locations[layer][expert]
        out: list[np.ndarray | None] = [None] * n
        for i, p in enumerate(range(first, first + n)):
            size = loc.plane_offsets[p + 1] - loc.plane_offsets[p]
            fd = self._direct_fd(layer) if size >= DIRECT_MIN else None
            if fd is not None:
                out[i] = self._read_direct(fd, layer, expert, p, loc.offset + loc.plane_offsets[p], size)
        i = 0
        while i < n:  # the rest in runs, one preadv each
            if out[i] is not None:
                i += 1
                continue
            j = i
            while j < n and out[j] is None:
                j += 1
            bufs = [alloc(loc.plane_offsets[first + k + 1] - loc.plane_offsets[first + k]) for k in range(i, j)]
            self.read_planes(layer, expert, first + i, bufs)
            out[i:j] = bufs
            i = j
        return out

    def _read_direct(self, fd: int, layer: int, expert: int, plane: int, start: int, size: int) -> np.ndarray | None:
        head = start % PAGE
        raw = alloc(-(-(head + size) // PAGE) * PAGE)
        try:
            got = os.preadv(fd, [memoryview(raw)], start - head)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise EdgeMoEError(
                    f"{self.root / shard_name(layer)}: read of layer {layer} expert {expert} failed ({exc.strerror})"
                ) from None
            self._direct_fds[layer] = None  # O_DIRECT refused after all: buffered from now on
            os.close(fd)
            return None
        if got < head + size:
            raise EdgeMoEError(
                f"{self.root / shard_name(layer)}: truncated shard: layer {layer} expert {expert} plane {plane} "
                f"needs {size} bytes at offset {start}, got {max(got - head, 0)}"
            )
        buf = raw[head : head + size]
        self.bytes_read += size
        self._check_plane(layer, expert, plane, buf)
        return buf

    def _check_range(self, layer: int, expert: int, first: int, n: int) -> None:
        if not (
            0 <= layer < len(self.locations)
            and 0 <= expert < len(self.locations[layer])
            and first + n <= len(self.locations[layer][expert].checksums)
        ):
            raise EdgeMoEError(
                f"{self.root / MANIFEST}: no planes {first}..{first + n - 1} of layer {layer} "
                f"expert {expert} in this store"
            )

    def _check_plane(self, layer: int, expert: int, plane: int, buf: np.ndarray) -> None:
        if checksum(buf) != self.locations[layer][expert].checksums[plane]:
            raise EdgeMoEError(
                f"{self.root / shard_name(layer)}: checksum mismatch in layer {layer} expert {expert} "
                f"plane {plane}: the shard is damaged; convert the model again"
            )

    def read_planes(self, layer: int, expert: int, first: int, bufs: list[np.ndarray]) -> None:
        """Read planes first .. first+len(bufs)-1 of one expert into bufs (one contiguous preadv)."""
        self._check_range(layer, expert, first, len(bufs))
        loc = self.locations[layer][expert]
        start = loc.offset + loc.plane_offsets[first]
        want = sum(b.nbytes for b in bufs)
        fd = self._fd(layer)
        try:
            got = os.preadv(fd, [memoryview(b) for b in bufs], start)
        except OSError as exc:
            raise EdgeMoEError(
                f"{self.root / shard_name(layer)}: read of layer {layer} expert {expert} failed ({exc.strerror})"
            ) from None
        self.bytes_read += got
        # The planes now live in our buffers: drop the page cache's copy, which would otherwise
        # count against a memory cgroup and push out the memory-mapped dense weights.
        os.posix_fadvise(fd, start, want, os.POSIX_FADV_DONTNEED)
        if got != want:
            raise EdgeMoEError(
                f"{self.root / shard_name(layer)}: truncated shard: layer {layer} expert {expert} planes "
                f"{first}..{first + len(bufs) - 1} need {want} bytes at offset {start}, got {got}"
            )
        for i, b in enumerate(bufs):
            self._check_plane(layer, expert, first + i, b)

    def matrix_planes(self, bufs: list[np.ndarray], layer: int) -> dict[str, list[np.ndarray]]:
        """An expert of this layer's plane buffers (plane 0 first) as each matrix's planes:
        {matrix: [views of its bytes in each plane]}."""
        out: dict[str, list[np.ndarray]] = {m: [] for m in MATRICES}
        for plane, buf in enumerate(bufs):
            pos = 0
            for m in MATRICES:
                n = self.plane_bytes[layer][m][plane]
                out[m].append(buf[pos : pos + n])
                pos += n
        return out

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd is not None:
                os.close(fd)
        self._fds, self._direct_fds = {}, {}
