"""Q4_K weights repacked into ggml's block_q4_Kx8 (edgemoe.quant.repack, kernels.pack): the
repacked gemv/gemm give what ggml's per-row vec_dot gives, and a Q4_K_M model run in place (its
Q4_K matrices repacked, as llama.cpp repacks them on this CPU) gives llama.cpp's logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import llama_cpp_logits, random_ids
from gguf import GGMLQuantizationType as QT

import edgemoe
from edgemoe.quant import kernels
from edgemoe.runtime import llama_ref

pytestmark = pytest.mark.skipif(
    kernels.BACKEND != "ggml" or not kernels.can_pack_shape(QT.Q4_K, 8),
    reason="ggml's repacked Q4_K kernels are not in this build (or not chosen on this CPU)",
)


def _q4_k(n_out: int, n_in: int, seed: int = 0) -> np.ndarray:
    """uint8 [n_out, row_bytes]: Q4_K rows written by llama.cpp's quantizer."""
    w = (np.random.default_rng(seed).standard_t(4, size=(n_out, n_in)) * 0.02).astype(np.float32)
    return kernels._lib.quantize(int(QT.Q4_K), w)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [1, 3, 4, 7, 32])
def test_repacked_q4_k_gives_the_per_row_result(T, threads, monkeypatch):
    """gemv (T < 4) and gemm (groups of 4 rows, the rest by gemv) on block_q4_Kx8 give what
    vec_dot per row gives on the plain rows, up to the order of float sums; a byte of a scale, a
    min or a code in the wrong place moves the result by far more. 136 rows: 17 groups of 8, split
    unevenly across threads."""
    monkeypatch.setattr(kernels, "THREADS", threads)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_BYTES", 0, raising=False)  # fork even for small products
    n_out, n_in = 136, 768
    data = _q4_k(n_out, n_in, seed=5)
    plain = kernels.QWeight(data, QT.Q4_K, n_in)
    packed = kernels.QWeight(data.copy(), QT.Q4_K, n_in)
    assert kernels.can_pack(packed)
    kernels.pack(packed)
    assert packed.packed and packed.nbytes == plain.nbytes and not np.array_equal(packed.data, data)
    x = np.random.default_rng(T).standard_normal((T, n_in)).astype(np.float32)
    want = kernels.matmul(plain, x)
    assert rel_err(kernels.matmul(packed, x), want) < 1e-5
    ref = gguf.quants.dequantize(data, QT.Q4_K).reshape(n_out, n_in)
    assert rel_err(want, x @ ref.T) < 2e-2  # the per-row path itself (activations in Q8_K)


def test_the_layout_and_its_inverse():
    """block_q4_Kx8 as ggml's repack.h and make_block_q4_Kx8 define it: per 8 rows and 256
    inputs, the 8 d, the 8 dmin, 8 words of the rows' scales and mins by sub-block, then the
    codes in 8-byte pieces taken from the rows in turn; unpack inverts it byte for byte."""
    n_out, n_in = 16, 512
    data = _q4_k(n_out, n_in, seed=3)
    w = kernels.pack(kernels.QWeight(data.copy(), QT.Q4_K, n_in))
    np.testing.assert_array_equal(kernels.unpack(w), data)
    blocks = data.reshape(n_out, 2, 144)
    got = w.data.reshape(2, 2, 1152)  # [row group, block column, block_q4_Kx8]
    g, b = 1, 1
    rows = blocks[8 * g : 8 * g + 8, b]
    np.testing.assert_array_equal(got[g, b, :16].reshape(8, 2), rows[:, 0:2])  # d
    np.testing.assert_array_equal(got[g, b, 16:32].reshape(8, 2), rows[:, 2:4])  # dmin
    # sub-block 0: the rows' 6-bit scales in the low bits of the word's first bytes / mins after
    np.testing.assert_array_equal(got[g, b, 32:36] & 63, rows[:4, 4] & 63)
    np.testing.assert_array_equal(got[g, b, 36:40] & 63, rows[:4, 8] & 63)
    for piece in (0, 1, 7, 8, 13, 127):
        src = rows[piece % 8, 16 + (piece // 8) * 8 :][:8]
        np.testing.assert_array_equal(got[g, b, 128 + 8 * piece :][:8], src)


def test_pack_leaves_what_it_cannot_take():
    """Q4_K rows not a multiple of 8, or read-only bytes (a file mapping), stay as they are."""
    odd = _q4_k(60, 256)
    ro = _q4_k(64, 256)
    ro.flags.writeable = False
    for d in (odd, ro):
        w = kernels.QWeight(d, QT.Q4_K, 256)
        before = d.copy()
        assert not kernels.pack(w).packed
        np.testing.assert_array_equal(w.data, before)


@pytest.mark.parametrize("arch", ["olmoe", "qwen3moe"])
def test_q4_k_m_in_place_gives_llama_cpps_logits(build_model, arch):
    """A Q4_K_M file run in place: its Q4_K matrices (attention, experts) are repacked, and the
    logits are llama.cpp's (which repacks them too): identical for one token (gemv on both
    sides), to float rounding for a 40-token prompt (gemm in groups of 4, as llama.cpp's). On an
    AMX build llama.cpp runs without repacking (edgemoe.runtime.llama_ref): float rounding for both."""
    path = build_model(arch, "Q4_K_M")
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        q4k = {n for n, t in m._file.tensors.items() if t.qtype == QT.Q4_K and len(t.shape) >= 2}
        assert q4k and q4k <= m._file.packed | {"token_embd.weight"}
        one = random_ids(1, m.config.n_vocab, seed=2)
        prompt = random_ids(40, m.config.n_vocab, seed=2)
        ours_one = m.logits(one)  # each from a fresh context
        ours = m.logits(prompt)
    want_one = llama_cpp_logits(path, one)
    if llama_ref.amx_build():  # llama.cpp does not repack here (llama_ref): its per-row path rounds apart
        assert float(np.abs(ours_one - want_one).max() / want_one.std()) <= 1e-5
    else:
        np.testing.assert_array_equal(ours_one, want_one)
    ref = llama_cpp_logits(path, prompt)
    assert float(np.abs(ours - ref).max() / ref.std()) <= 1e-5
