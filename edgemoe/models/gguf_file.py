"""Open a GGUF file with gguf-py: metadata as plain values, tensors as zero-copy memmap views.

Everything that can go wrong with a file the user hands us is turned into one EdgeMoEError that
names the file and the problem; nothing here expands a tensor to float32.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import EdgeMoEError

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
        # gguf-py parses the whole header eagerly and allocates what it says: check it first
        prescan(self.path)
        try:
            self._reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, TypeError, OverflowError, MemoryError, KeyError) as exc:
            raise EdgeMoEError(f"{self.path}: truncated or corrupt GGUF file ({exc})") from None
        self.file_size = self.path.stat().st_size
        self.in_memory = False
        self.packed: set[str] = set()  # tensors whose in-memory bytes kernels.pack rewrote
        self.on_disk: dict[str, int] = {}  # tensors load_into_memory left in the file: offset
        self._fd: int | None = None
        self.metadata: dict[str, Any] = {}
        try:
            for name, field in self._reader.fields.items():
                if name.startswith("GGUF."):
                    continue
                self.metadata[name] = _field_value(field)
        except (ValueError, IndexError, TypeError) as exc:  # e.g. a string value that is not UTF-8
            raise EdgeMoEError(f"{self.path}: corrupt GGUF metadata ({exc})") from None
        _check_vocab(self.path, self.metadata)
        # gguf-py keeps a numpy array per vocabulary entry (~100 MB for a 50k vocabulary): drop them
        # and the long arrays (llama.cpp reads the vocabulary itself; copy_metadata re-reads them)
        self._reader.fields.clear()
        for name in [k for k, v in self.metadata.items() if isinstance(v, (list, np.ndarray)) and len(v) > 1024]:
            del self.metadata[name]
        _trim_heap()
        self.tensors: dict[str, Tensor] = {}
        for t in self._reader.tensors:
            end = t.data_offset + t.n_bytes
            if end > self.file_size:
                raise EdgeMoEError(
                    f"{self.path}: truncated GGUF file: tensor {t.name} ends at byte {end}, "
                    f"file has {self.file_size}"
                )
            self.tensors[t.name] = Tensor(t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.data)
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The metadata every architecture shares against the tensors' shapes (gguf convention):
        a mismatch would size buffers from a number the weights contradict."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            return

        def num(key: str) -> int | None:
            v = self.metadata.get(f"{arch}.{key}")
            return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None

        n_embd, n_expert, n_layer = num("embedding_length"), num("expert_count"), num("block_count")
        tok = self.tensors.get("token_embd.weight")
        if n_embd is not None and tok is not None and tok.shape[0] != n_embd:
            raise EdgeMoEError(f"{self.path}: {arch}.embedding_length is {n_embd} but token_embd.weight has "
                               f"shape {list(tok.shape)}")
        for name, t in self.tensors.items():
            if n_expert is not None and name.endswith("_exps.weight") and t.shape[-1] != n_expert:
                raise EdgeMoEError(f"{self.path}: {arch}.expert_count is {n_expert} but {name} has shape "
                                   f"{list(t.shape)}")
            if n_layer is not None and name.startswith("blk."):
                idx = name.split(".", 2)[1]
                if idx.isdigit() and int(idx) >= n_layer:
                    raise EdgeMoEError(f"{self.path}: tensor {name} is beyond {arch}.block_count = {n_layer}")

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

    def load_into_memory(self, on_disk: tuple[str, ...] = ()) -> None:
        """Replace the memory-mapped tensor views with views of one anonymous copy of the file.
        A memory cgroup reclaims clean file pages under pressure and faults them back in from
        storage every token; anonymous pages stay. Used for an expert store's dense weights.
        Tensors named in on_disk are not copied: only rows of them are read, with read_rows
        (the token embedding: a few rows per token)."""
        import mmap as _mmap

        base = self._reader.data
        start = {name: t.data.__array_interface__["data"][0] - base.__array_interface__["data"][0]
                 for name, t in self.tensors.items()}
        skip = sorted((start[n], start[n] + self.tensors[n].data.nbytes) for n in on_disk if n in self.tensors)
        buf = _mmap.mmap(-1, max(self.file_size, 1))  # pages never written cost no memory
        with open(self.path, "rb", buffering=0) as f:
            view = memoryview(buf)
            for a, b in _gaps(skip, self.file_size):
                pos = a
                while pos < b:
                    n = os.preadv(f.fileno(), [view[pos : min(pos + (64 << 20), b)]], pos)
                    if not n:
                        raise EdgeMoEError(f"{self.path}: file shrank while it was being read")
                    pos += n
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        raw = np.frombuffer(buf, dtype=np.uint8)
        for name, t in self.tensors.items():
            if name in on_disk:
                self.on_disk[name] = start[name]
                continue
            arr = raw[start[name] : start[name] + t.data.nbytes].view(t.data.dtype).reshape(t.data.shape)
            self.tensors[name] = Tensor(t.name, t.qtype, t.shape, arr)
        if self.on_disk and self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        self.in_memory = True

    def release(self, arr: np.ndarray) -> None:
        """Hand back the pages of a memory-mapped tensor view that has been read: they leave this
        process's resident set and the page cache, and a later access reads them from storage
        again. For one pass over a file larger than the memory budget (conversion), where mapped
        pages that were read once would otherwise count against the budget until the end."""
        if self.in_memory or self._reader is None:
            return
        base = self._reader.data
        mm = getattr(base, "_mmap", None)
        if mm is None or arr.nbytes == 0:
            return
        first = arr.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        start = first - first % mmap.PAGESIZE
        length = first + arr.nbytes - start
        mm.madvise(mmap.MADV_DONTNEED, start, length)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the file held in memory after load_into_memory (all of it before)."""
        return self.file_size - sum(self.tensors[n].data.nbytes for n in self.on_disk)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows [len(rows), row bytes] of a 2-D tensor left on disk by load_into_memory, by pread."""
        t = self.tensors[name]
        n_rows, rb = t.data.shape[0], t.data.shape[-1] * t.data.itemsize
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            bad = rows[(rows < 0) | (rows >= n_rows)][0]
            raise EdgeMoEError(f"{self.path}: tensor {name}: row {bad} out of range [0, {n_rows})")
        out = np.empty((rows.size, rb), np.uint8)
        for i, r in enumerate(rows.tolist()):
            if os.preadv(self._fd, [out[i]], self.on_disk[name] + r * rb) != rb:
                raise EdgeMoEError(f"{self.path}: tensor {name}: row {r} cannot be read (file truncated?)")
        return out.view(t.data.dtype) if t.data.dtype != np.uint8 else out

    def copy_metadata(self, writer, skip: tuple[str, ...] = ("general.architecture", "general.alignment")) -> None:
        """Copy every metadata key-value of this file into a gguf.GGUFWriter (the file's header is
        parsed again: the long arrays are not kept after opening)."""
        for name, field in GGUFReader(self.path, "r").fields.items():
            if name.startswith("GGUF.") or name in skip:
                continue
            vt = field.types[0]
            if vt == GGUFValueType.ARRAY:
                if field.types[-1] == GGUFValueType.STRING:
                    writer.add_array(name, field.contents())
                else:
                    writer.add_key_value(name, _field_value(field).tolist(), vt, sub_type=field.types[-1])
            elif vt == GGUFValueType.STRING:
                writer.add_string(name, field.contents())
            else:
                writer.add_key_value(name, field.contents(), vt)

    def close(self) -> None:
        # Drop every view so the memmap can be unmapped once the last reference goes.
        self.tensors = {}
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        mm = getattr(self._reader, "data", None)
        self._reader = None  # type: ignore[assignment]
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            try:
                mm._mmap.close()
            except (BufferError, ValueError):
                pass  # still referenced by a view somewhere; freed with it


def add_scalar_kv(writer, key: str, value: Any) -> None:
    """One metadata key-value into a gguf.GGUFWriter, typed from the Python value (bool, int as
    uint32, float as float32, anything else as a string)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def _gaps(skip: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """[0, size) without the sorted ranges in skip."""
    out, pos = [], 0
    for a, b in skip:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < size:
        out.append((pos, size))
    return out


def _check_vocab(path: Path, meta: dict[str, Any]) -> None:
    """What llama.cpp's vocabulary loader asserts (it aborts the process instead of failing)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not isinstance(tokens, list):
        raise EdgeMoEError(f"{path}: tokenizer.ggml.tokens is not an array of strings")
    # llama.cpp reads each token as a C string: a NUL ends it there
    texts = [t.split("\x00", 1)[0] for t in tokens] if any("\x00" in t for t in tokens) else tokens
    if len(set(texts)) != len(texts):
        seen: set[str] = set()
        dup = next(t for t in texts if t in seen or seen.add(t))
        raise EdgeMoEError(f"{path}: corrupt vocabulary: token {dup!r} appears more than once in tokenizer.ggml.tokens")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = meta.get(key)
        if v is not None and len(v) != len(tokens):
            raise EdgeMoEError(f"{path}: {key} has {len(v)} entries, tokenizer.ggml.tokens has {len(tokens)}")


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc); elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


# ---- header pre-scan -----------------------------------------------------------------------------

# GGUFValueType -> fixed byte size (STRING and ARRAY are variable)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
GGML_MAX_DIMS = 4
MAX_ARRAY_DEPTH = 4
DEFAULT_ALIGNMENT = 32


class _Scan:
    def __init__(self, path: Path, buf, size: int, endian: str):
        self.path, self.buf, self.size, self.e, self.pos = path, buf, size, endian, 0

    def fail(self, what: str) -> EdgeMoEError:
        return EdgeMoEError(f"{self.path}: corrupt GGUF header: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file has {self.size} "
                            f"(truncated file or a bad length)")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(self.e + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str, decode: bool = False) -> str | None:
        n = self.unpack("Q", f"length of {what}")
        self.need(n, f"{what} (a string of {n} bytes)")
        raw = bytes(self.buf[self.pos : self.pos + n]) if decode else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_SIZE:
            n = _SCALAR_SIZE[vtype]
            self.need(n, f"value of {key}")
            raw = self.buf[self.pos : self.pos + n]
            self.pos += n
            return raw
        if vtype == _STRING:
            self.string(f"value of {key}")
            return None
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            sub = self.unpack("I", f"array type of {key}")
            count = self.unpack("Q", f"array length of {key}")
            if sub in _SCALAR_SIZE:
                self.skip(count * _SCALAR_SIZE[sub], f"{key} (an array of {count} values)")
                return None
            if sub not in (_STRING, _ARRAY):
                raise self.fail(f"{key}: unknown array element type {sub}")
            # every element takes at least 8 bytes (a string's length, an array's type+count 12)
            self.need(count * 8, f"{key} (an array of {count} elements)")
            if sub == _STRING:  # vocabularies: 100k+ strings, a tight loop
                pos, size, unpack = self.pos, self.size, struct.Struct(self.e + "Q").unpack_from
                for _ in range(count):
                    if pos + 8 > size:
                        break
                    pos += 8 + unpack(self.buf, pos)[0]
                    if pos > size:
                        break
                else:
                    self.pos = pos
                    return None
                raise self.fail(f"{key}: its strings run past the end of the file ({size} bytes)")
            for _ in range(count):
                self.value(sub, key, depth + 1)
            return None
        raise self.fail(f"{key}: unknown value type {vtype}")


def prescan(path: str | os.PathLike[str]) -> None:
    """Check a GGUF header cheaply before gguf-py parses it (gguf-py allocates whatever the header
    says): counts against the file size, string and array lengths against the bytes left, types,
    tensor dimensions, sizes, alignment and overlaps. Raises EdgeMoEError naming the problem."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise EdgeMoEError(f"{path}: truncated GGUF file ({size} bytes, the header alone takes 24)")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        _prescan(path, buf, size)
    finally:
        buf.close()


def _prescan(path: Path, buf, size: int) -> None:
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0:
        endian = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise EdgeMoEError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    s = _Scan(path, buf, size, endian)
    s.pos = 8
    n_tensors = s.unpack("Q", "tensor count")
    n_kv = s.unpack("Q", "key-value count")
    # a key-value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info 8 + 4 + 4 + 8
    if n_kv * 13 > size - s.pos:
        raise s.fail(f"{n_kv} key-values cannot fit in a file of {size} bytes")
    if n_tensors * 24 > size - s.pos:
        raise s.fail(f"{n_tensors} tensors cannot fit in a file of {size} bytes")
    alignment = DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for _ in range(n_kv):
        key = s.string("a metadata key", decode=True)
        if key in keys:
            raise s.fail(f"duplicate metadata key {key!r}")
        keys.add(key)
        vtype = s.unpack("I", f"type of {key}")
        raw = s.value(vtype, key)
        if key == "general.alignment":
            if vtype != _UINT32:
                raise s.fail(f"general.alignment has type {vtype}, not uint32")
            (alignment,) = struct.unpack(endian + "I", raw)
            if alignment == 0 or alignment & (alignment - 1):
                raise s.fail(f"general.alignment {alignment} is not a power of two")
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = s.string(f"the name of tensor {i}", decode=True)
        if name in names:
            raise s.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = s.unpack("I", f"dimension count of {name}")
        if n_dims > GGML_MAX_DIMS:
            raise s.fail(f"tensor {name} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        dims = [s.unpack("Q", f"dimensions of {name}") for _ in range(n_dims)]
        qtype = s.unpack("I", f"type of {name}")
        offset = s.unpack("Q", f"offset of {name}")
        try:
            block, bsize = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise s.fail(f"tensor {name} has unknown type {qtype}") from None
        if 0 in dims:
            raise s.fail(f"tensor {name} has a zero dimension {dims}")
        n_elems = 1
        for d in dims:
            n_elems *= d
            if n_elems > size * 64:  # no type packs more than 64 elements per byte: cannot fit
                raise s.fail(f"tensor {name} dimensions {dims} cannot fit in a file of {size} bytes")
        if dims and dims[0] % block:
            raise s.fail(f"tensor {name}: row length {dims[0]} is not a multiple of its type's block {block}")
        nbytes = n_elems // block * bsize
        if offset % alignment:
            raise s.fail(f"tensor {name} data offset {offset} is not a multiple of the alignment {alignment}")
        infos.append((offset, nbytes, name))
    data_start = s.pos + (-s.pos) % alignment
    for offset, nbytes, name in infos:
        end = data_start + offset + nbytes
        if end > size:
            raise EdgeMoEError(f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, file has {size}")
    infos.sort()
    for (o1, n1, a), (o2, _n2, b) in zip(infos, infos[1:]):
        if o1 + n1 > o2:
            raise s.fail(f"tensors {a} and {b} overlap (bytes {o1}..{o1 + n1} and {o2}..)")


def embedding_on_disk(gf) -> tuple[str, ...]:
    """The token embedding stays in the file (a few rows read per token) unless the output layer
    shares it (tied embeddings: every row is used every token)."""
    return ("token_embd.weight",) if gf.maybe("output.weight") is not None else ()
