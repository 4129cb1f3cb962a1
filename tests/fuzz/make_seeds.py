#!/usr/bin/env python3
"""Write tests/fuzz/seeds/*.gguf: small hostile GGUF files, one per header attack (and per crash
the fuzzers found). Every one must be rejected with an EdgeMoEError before any large allocation.

    python tests/fuzz/make_seeds.py      # rewrites the directory
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz.gguf_layout import layout, put_u32, put_u64  # noqa: E402


def base(path: Path, tokens=("a", "b", "c"), extra=None) -> bytes:
    import gguf

    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_uint32("qwen3moe.block_count", 1)
    w.add_token_list(list(tokens))
    w.add_token_scores([0.0] * len(tokens))
    if extra:
        extra(w)
    w.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def main() -> None:
    out = HERE / "seeds"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.gguf"):
        old.unlink()
    tmp = out / "_base.tmp"
    data = base(tmp)
    lay = layout(data)
    t_embd, t_norm = lay.tensors["token_embd.weight"], lay.tensors["output_norm.weight"]
    key0 = lay.kvs[0]
    tokens_kv = next(k for k in lay.kvs if k[0] == "tokenizer.ggml.tokens")
    cases: dict[str, bytes] = {}

    def patch(name: str, fn) -> None:
        buf = bytearray(data)
        fn(buf)
        cases[name] = bytes(buf)

    patch("huge-tensor-count", lambda b: put_u64(b, lay.n_tensors_pos, 2**62))
    patch("huge-kv-count", lambda b: put_u64(b, lay.n_kv_pos, 2**40))
    patch("absurd-key-length", lambda b: put_u64(b, key0[1], 2**63))
    patch("absurd-tensor-name-length", lambda b: put_u64(b, t_norm["name_len"], 2**40))
    patch("huge-dims", lambda b: (put_u64(b, t_embd["dims"][0], 2**32), put_u64(b, t_embd["dims"][1], 2**32)))
    patch("dims-product-overflow", lambda b: [put_u64(b, d, 2**64 - 1) for d in t_embd["dims"]])
    patch("offset-past-end", lambda b: put_u64(b, t_norm["offset"], 2**40))
    patch("overlapping-tensors", lambda b: put_u64(b, t_norm["offset"], t_embd["offset_value"] + 32))
    patch("misaligned-offset", lambda b: put_u64(b, t_norm["offset"], t_norm["offset_value"] + 4))
    patch("unknown-tensor-type", lambda b: put_u32(b, t_norm["type"], 4242))
    patch("too-many-dims", lambda b: put_u32(b, t_norm["n_dims"], 7))
    patch("zero-dim", lambda b: put_u64(b, t_embd["dims"][0], 0))
    patch("unknown-value-type", lambda b: put_u32(b, key0[2], 77))
    patch("huge-array-count", lambda b: put_u64(b, tokens_kv[3] + 4, 2**60))
    patch("array-of-unknown-type", lambda b: put_u32(b, tokens_kv[3], 99))
    patch("bad-version", lambda b: put_u32(b, 4, 99))
    patch("key-not-utf8", lambda b: b.__setitem__(key0[1] + 8, 0xFF))
    cases["truncated-header"] = data[: lay.header_end - 5]
    cases["truncated-data"] = data[: lay.data_start + 64]
    buf = bytearray(data)  # GGUFWriter refuses duplicate keys: rename one key to another's (same length)
    k_bc = next(k for k in lay.kvs if k[0] == "qwen3moe.block_count")
    k_ar = next(k for k in lay.kvs if k[0] == "general.architecture")
    if len("qwen3moe.block_count") == len("general.architecture"):
        buf[k_bc[1] + 8 : k_bc[1] + 8 + len(k_bc[0])] = k_ar[0].encode()
    cases["duplicate-key"] = bytes(buf)
    # what the fuzzers found: llama.cpp aborts the process (GGML_ASSERT) on a duplicate token, and
    # reads tokens as C strings (a NUL makes "ab\0c" a duplicate of "ab")
    cases["duplicate-token"] = base(tmp, tokens=("a", "b", "a"))
    cases["token-nul-duplicate"] = base(tmp, tokens=("ab", "ab\x00c", "d"))
    cases["scores-length-mismatch"] = base(tmp, extra=lambda w: w.add_token_types([1]))
    buf = bytearray(base(tmp, extra=lambda w: w.add_uint32("general.alignment", 32)))
    lay2 = layout(bytes(buf))
    put_u32(buf, next(k for k in lay2.kvs if k[0] == "general.alignment")[3], 0)
    cases["alignment-zero"] = bytes(buf)
    put_u32(buf, next(k for k in lay2.kvs if k[0] == "general.alignment")[3], 48)
    cases["alignment-not-power-of-two"] = bytes(buf)
    tmp.unlink()
    for name, blob in cases.items():
        (out / f"{name}.gguf").write_bytes(blob)
    print(f"{len(cases)} seeds in {out}")


if __name__ == "__main__":
    main()
