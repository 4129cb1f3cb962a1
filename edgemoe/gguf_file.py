"""Open a GGUF file with gguf-py: metadata as plain values, tensors as zero-copy memmap views.

Everything that can go wrong with a file the user hands us is turned into one EdgeMoEError that
names the file and the problem; nothing here expands a tensor to float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import EdgeMoEError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file: its GGUF name, type, GGUF shape (innermost first) and data view."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray  # memmap view: float32/float16 [..., n] or uint8 [..., row_bytes]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise EdgeMoEError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise EdgeMoEError(f"{self.path}: is a directory, not a GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise EdgeMoEError(f"{self.path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
        try:
            self._reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as exc:
            raise EdgeMoEError(f"{self.path}: truncated or corrupt GGUF file ({exc})") from None
        self.file_size = self.path.stat().st_size
        self.in_memory = False
        self.metadata: dict[str, Any] = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF."):
                continue
            self.metadata[name] = _field_value(field)
        self.tensors: dict[str, Tensor] = {}
        for t in self._reader.tensors:
            end = t.data_offset + t.n_bytes
            if end > self.file_size:
                raise EdgeMoEError(
                    f"{self.path}: truncated GGUF file: tensor {t.name} ends at byte {end}, "
                    f"file has {self.file_size}"
                )
            self.tensors[t.name] = Tensor(t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.data)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise EdgeMoEError(f"{self.path}: GGUF metadata has no general.architecture")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise EdgeMoEError(f"{self.path}: GGUF metadata key {key} is missing")
        return self.metadata[key]

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise EdgeMoEError(f"{self.path}: tensor {name} is missing") from None

    def maybe(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    def load_into_memory(self) -> None:
        """Replace the memory-mapped tensor views with views of one anonymous copy of the file.
        A memory cgroup reclaims clean file pages under pressure and faults them back in from
        storage every token; anonymous pages stay. Used for an expert store's dense weights."""
        import mmap as _mmap

        buf = _mmap.mmap(-1, max(self.file_size, 1))
        with open(self.path, "rb", buffering=0) as f:
            view = memoryview(buf)
            pos = 0
            while pos < self.file_size:
                n = f.readinto(view[pos : min(pos + (64 << 20), self.file_size)])
                if not n:
                    raise EdgeMoEError(f"{self.path}: file shrank while it was being read")
                pos += n
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        raw = np.frombuffer(buf, dtype=np.uint8)
        base = self._reader.data
        for name, t in self.tensors.items():
            off = t.data.__array_interface__["data"][0] - base.__array_interface__["data"][0]
            arr = raw[off : off + t.data.nbytes].view(t.data.dtype).reshape(t.data.shape)
            self.tensors[name] = Tensor(t.name, t.qtype, t.shape, arr)
        self.in_memory = True

    def copy_metadata(self, writer, skip: tuple[str, ...] = ("general.architecture", "general.alignment")) -> None:
        """Copy every metadata key-value of this file into a gguf.GGUFWriter."""
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF.") or name in skip:
                continue
            vt = field.types[0]
            if vt == GGUFValueType.ARRAY:
                if field.types[-1] == GGUFValueType.STRING:
                    writer.add_array(name, field.contents())
                else:
                    writer.add_key_value(name, self.metadata[name].tolist(), vt, sub_type=field.types[-1])
            elif vt == GGUFValueType.STRING:
                writer.add_string(name, field.contents())
            else:
                writer.add_key_value(name, field.contents(), vt)

    def close(self) -> None:
        # Drop every view so the memmap can be unmapped once the last reference goes.
        self.tensors = {}
        mm = getattr(self._reader, "data", None)
        self._reader = None  # type: ignore[assignment]
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            try:
                mm._mmap.close()
            except (BufferError, ValueError):
                pass  # still referenced by a view somewhere; freed with it


def _field_value(field: Any) -> Any:
    main = field.types[0] if field.types else None
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return field.contents()
        # numeric arrays: one numpy array (token scores and types are long)
        if not field.data:
            return np.array([])
        return np.concatenate([field.parts[i] for i in field.data])
    return field.contents()
