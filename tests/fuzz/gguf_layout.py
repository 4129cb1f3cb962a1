"""Where each header field of a (well-formed, little-endian) GGUF file lies: the fuzzers and the
hostile-header tests overwrite these fields with absurd values."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    n_tensors_pos: int = 16 - 8
    n_kv_pos: int = 16
    # (key, key length pos, type pos, value pos, value type)
    kvs: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    # name -> dict(name_len=pos, n_dims=pos, dims=[pos..], type=pos, offset=pos, offset_value=int)
    tensors: dict[str, dict] = field(default_factory=dict)
    data_start: int = 0
    header_end: int = 0

    def u64_fields(self) -> list[int]:
        """Positions of every 8-byte count, length, dimension and offset."""
        out = [self.n_tensors_pos, self.n_kv_pos]
        out += [k[1] for k in self.kvs]
        for t in self.tensors.values():
            out += [t["name_len"], *t["dims"], t["offset"]]
        return out

    def u32_fields(self) -> list[int]:
        out = [k[2] for k in self.kvs]
        for t in self.tensors.values():
            out += [t["n_dims"], t["type"]]
        return out


def layout(buf: bytes) -> Layout:
    lay = Layout()
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
    pos = 24

    def skip_value(pos: int, vtype: int) -> int:
        if vtype in SCALAR:
            return pos + SCALAR[vtype]
        if vtype == 8:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return pos + 8 + n
        sub, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        for _ in range(count):
            pos = skip_value(pos, sub)
        return pos

    alignment = 32
    for _ in range(n_kv):
        klen_pos = pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", buf, pos)
        lay.kvs.append((key, klen_pos, pos, pos + 4, vtype))
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = skip_value(pos + 4, vtype)
    for _ in range(n_tensors):
        t = {"name_len": pos}
        (n,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        t["n_dims"] = pos
        (nd,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        t["dims"] = [pos + 8 * i for i in range(nd)]
        t["dim_values"] = list(struct.unpack_from(f"<{nd}Q", buf, pos))
        pos += 8 * nd
        t["type"] = pos
        t["type_value"] = struct.unpack_from("<I", buf, pos)[0]
        t["offset"] = pos + 4
        t["offset_value"] = struct.unpack_from("<Q", buf, pos + 4)[0]
        pos += 12
        lay.tensors[name] = t
    lay.header_end = pos
    lay.data_start = pos + (-pos) % alignment
    return lay


def put_u64(buf: bytearray, pos: int, v: int) -> None:
    struct.pack_into("<Q", buf, pos, v % 2**64)


def put_u32(buf: bytearray, pos: int, v: int) -> None:
    struct.pack_into("<I", buf, pos, v % 2**32)
