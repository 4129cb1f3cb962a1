"""Kernels on GGUF-quantized weights against x @ dequantize(W).T (gguf-py as the reference)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from edgemoe.errors import EdgeMoEError
from edgemoe.quant import kernels

# byte offsets of the fp16 scale fields in each block (ggml-common.h block layouts)
_FP16_FIELDS = {
    QT.Q4_0: [0],
    QT.Q4_1: [0, 2],
    QT.Q5_0: [0],
    QT.Q5_1: [0, 2],
    QT.Q8_0: [0],
    QT.Q2_K: [80, 82],
    QT.Q3_K: [108],
    QT.Q4_K: [0, 2],
    QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
    QT.IQ2_XXS: [0],
    QT.IQ2_XS: [0],
    QT.IQ2_S: [0],
    QT.IQ3_XXS: [0],
    QT.IQ3_S: [0],
    QT.IQ1_S: [0],
    QT.IQ4_NL: [0],
    QT.IQ4_XS: [0],
    QT.TQ1_0: [52],
    QT.TQ2_0: [64],
}
TYPES = [
    QT.F32,
    QT.F16,
    QT.BF16,
    QT.Q8_0,
    QT.Q4_0,
    QT.Q4_1,
    QT.Q5_0,
    QT.Q5_1,
    QT.Q2_K,
    QT.Q3_K,
    QT.Q4_K,
    QT.Q5_K,
    QT.Q6_K,
    QT.MXFP4,
    QT.IQ4_NL,
    QT.IQ4_XS,
    QT.IQ2_XXS,
    QT.IQ2_XS,
    QT.IQ2_S,
    QT.IQ3_XXS,
    QT.IQ3_S,
    QT.IQ1_S,
    QT.IQ1_M,
    QT.TQ1_0,
    QT.TQ2_0,
]


def random_blocks(qtype: QT, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_out, row_bytes] of random blocks with sane scales (for types gguf-py can't make)."""
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    nb = n_out * n_in // block
    b = rng.integers(0, 256, size=(nb, tsize), dtype=np.uint8)
    if qtype == QT.MXFP4:
        b[:, 0] = rng.integers(120, 128, size=nb)  # E8M0 exponent near 2^0
    elif qtype == QT.IQ1_M:
        # the fp16 scale is spread over the top nibbles of the 4 uint16 scales at byte 48
        d = rng.uniform(0.002, 0.02, size=nb).astype(np.float16).view(np.uint16)
        sc = b[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            sc[:, i] = (sc[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        b[:, 48:56] = sc.view(np.uint8)
    else:
        for off in _FP16_FIELDS[qtype]:
            d = rng.uniform(0.002, 0.02, size=nb).astype(np.float16)
            b[:, off : off + 2] = d.view(np.uint8).reshape(nb, 2)
    return b.reshape(n_out, n_in // block * tsize)


def make_weight(qtype: QT, n_out: int, n_in: int, seed: int = 0):
    """(data as GGUFReader would give it, float32 reference [n_out, n_in])."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05
    if qtype == QT.F32:
        return w, w
    if qtype == QT.F16:
        d = w.astype(np.float16)
        return d, d.astype(np.float32)
    try:
        data = gguf.quants.quantize(w, qtype)
    except (NotImplementedError, ValueError, TypeError):
        data = random_blocks(qtype, n_out, n_in, rng)
    ref = gguf.quants.dequantize(data, qtype).reshape(n_out, n_in).astype(np.float32)
    assert np.isfinite(ref).all()
    return data, ref


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.fixture(params=["ggml", "numpy"])
def backend(request, monkeypatch):
    """The kernels module reloaded with EDGEMOE_KERNELS forcing one backend."""
    monkeypatch.setenv("EDGEMOE_KERNELS", request.param)
    try:
        mod = importlib.reload(kernels)
    except EdgeMoEError as exc:
        monkeypatch.undo()
        importlib.reload(kernels)
        pytest.skip(f"backend {request.param} unavailable: {exc}")
    assert mod.BACKEND == request.param
    yield mod
    monkeypatch.undo()  # back to the environment the session started with
    importlib.reload(kernels)


# ggml quantizes activations (Q8_0/Q8_1/Q8_K, or F16/BF16) as llama.cpp does: ~1e-2 of scale
_GGML_TOL = {QT.F32: 1e-5, QT.F16: 2e-3, QT.BF16: 1e-2}


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(backend, qtype, T):
    if not backend.supported(qtype):
        pytest.skip(f"{qtype.name} not supported by {backend.BACKEND}")
    n_out, n_in = 48, 512
    data, ref = make_weight(qtype, n_out, n_in, seed=int(qtype))
    w = backend.QWeight(data, qtype, n_in, name="blk.0.ffn_up")
    assert w.shape == (n_out, n_in)
    assert w.nbytes == data.nbytes
    x = np.random.default_rng(1).standard_normal((T, n_in)).astype(np.float32)
    y = backend.matmul(w, x)
    assert y.dtype == np.float32 and y.shape == (T, n_out)
    expect = x.astype(np.float64) @ ref.T.astype(np.float64)
    tol = 1e-5 if backend.BACKEND == "numpy" else _GGML_TOL.get(qtype, 2e-2)
    assert rel_err(y, expect) < tol
    # 1-D input gives the same as a batch of one
    y1 = backend.matmul(w, x[0])
    assert y1.shape == (n_out,) and rel_err(y1, y[0]) < 1e-5


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.IQ4_NL, QT.MXFP4], ids=lambda t: t.name)
def test_ggml_does_what_llama_cpp_does(qtype):
    """For weights dotted with Q8_0 activations, ggml's result is x rounded to Q8_0 times W."""
    if kernels.BACKEND != "ggml":
        pytest.skip("ggml backend unavailable")
    n_out, n_in = 64, 1024
    data, ref = make_weight(qtype, n_out, n_in, seed=11)
    w = kernels.QWeight(data, qtype, n_in)
    x = np.random.default_rng(5).standard_normal((3, n_in)).astype(np.float32)
    xq = gguf.quants.dequantize(gguf.quants.quantize(x, QT.Q8_0), QT.Q8_0)
    expect = xq.astype(np.float64) @ ref.T.astype(np.float64)
    assert rel_err(kernels.matmul(w, x), expect) < 2e-6


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_exact(backend, qtype):
    if not backend.supported(qtype):
        pytest.skip(f"{qtype.name} not supported by {backend.BACKEND}")
    n_out, n_in = 20, 512
    data, ref = make_weight(qtype, n_out, n_in, seed=7)
    w = backend.QWeight(data, qtype, n_in, name="token_embd.weight")
    rows = np.array([3, 0, 19, 3], dtype=np.int64)
    got = backend.dequantize_rows(w, rows)
    assert got.dtype == np.float32 and got.shape == (4, n_in)
    np.testing.assert_array_equal(got, ref[rows])


def test_expert_slice_of_3d_tensor(backend):
    """One expert's contiguous slice of a stacked [n_expert, n_out, row_bytes] tensor."""
    n_exp, n_out, n_in = 3, 32, 256
    datas, refs = zip(*(make_weight(QT.Q4_K, n_out, n_in, seed=s) for s in range(n_exp)))
    stacked = np.stack(datas)
    x = np.random.default_rng(2).standard_normal((2, n_in)).astype(np.float32)
    for e in range(n_exp):
        w = backend.QWeight(stacked[e], QT.Q4_K, n_in, name=f"ffn_up_exps[{e}]")
        assert np.shares_memory(w.data, stacked)
        tol = 1e-5 if backend.BACKEND == "numpy" else 2e-2
        assert rel_err(backend.matmul(w, x), x @ refs[e].T) < tol


def test_weights_straight_from_gguf_reader(tmp_path):
    """QWeight on what GGUFReader returns: 2-D tensors and expert slices of a 3-D tensor."""
    n_exp, n_out, n_in = 4, 64, 256
    specs = {"w.f32": QT.F32, "w.f16": QT.F16, "w.bf16": QT.BF16, "w.q4_0": QT.Q4_0, "w.q6_k": QT.Q6_K}
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    refs = {}
    for name, q in specs.items():
        data, refs[name] = make_weight(q, n_out, n_in, seed=len(name))
        writer.add_tensor(name, data, raw_dtype=q)
    exps = [make_weight(QT.Q8_0, n_out, n_in, seed=40 + e) for e in range(n_exp)]
    writer.add_tensor("ffn_up_exps", np.stack([d for d, _ in exps]), raw_dtype=QT.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    tensors = {t.name: t for t in reader.tensors}
    x = np.random.default_rng(8).standard_normal((2, n_in)).astype(np.float32)
    for name, q in specs.items():
        t = tensors[name]
        w = kernels.QWeight(t.data, t.tensor_type, int(t.shape[0]), name=name)
        assert w.shape == (n_out, n_in) and w.qtype == q
        assert rel_err(kernels.matmul(w, x), x @ refs[name].T) < 2e-2
        np.testing.assert_array_equal(kernels.dequantize_rows(w, [5]), refs[name][[5]])
    t = tensors["ffn_up_exps"]
    assert t.data.shape[0] == n_exp
    for e in range(n_exp):
        w = kernels.QWeight(t.data[e], t.tensor_type, int(t.shape[0]), name=f"ffn_up_exps.{e}")
        assert rel_err(kernels.matmul(w, x), x @ exps[e][1].T) < 2e-2


def test_large_output_tiles(backend):
    """More rows than one numpy tile holds; a row count that is not a multiple of the tile."""
    n_out, n_in = 1000, 2048
    data, ref = make_weight(QT.Q8_0, n_out, n_in, seed=3)
    w = backend.QWeight(data, QT.Q8_0, n_in, name="output.weight")
    x = np.random.default_rng(4).standard_normal((3, n_in)).astype(np.float32)
    tol = 1e-5 if backend.BACKEND == "numpy" else 1e-2
    assert rel_err(backend.matmul(w, x), x @ ref.T) < tol


def test_concurrent_calls_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    ws = [
        kernels.QWeight(make_weight(q, 96, 512, seed=i)[0], q, 512)
        for i, q in enumerate([QT.Q4_K, QT.Q8_0, QT.Q6_K, QT.F16])
    ]
    x = np.random.default_rng(6).standard_normal((4, 512)).astype(np.float32)
    expect = [kernels.matmul(w, x) for w in ws]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda w: [kernels.matmul(w, x) for _ in range(20)][-1], ws))
            for g, e in zip(got, expect):
                np.testing.assert_array_equal(g, e)


def test_unsupported_type_names_tensor_and_type():
    data = np.zeros((4, 8 * 4), dtype=np.uint8)
    with pytest.raises(
        EdgeMoEError,
        match=r"tensor blk\.3\.attn_q\.weight: weight type I32 "
        r"is not supported",
    ):
        kernels.QWeight(data, QT.I32, 8, name="blk.3.attn_q.weight")
    assert not kernels.supported(QT.I32)
    assert not kernels.supported(12345)


def test_bad_shapes_are_reported():
    data, _ = make_weight(QT.Q8_0, 4, 64)
    with pytest.raises(EdgeMoEError, match="tensor t: row length 60"):
        kernels.QWeight(data, QT.Q8_0, 60, name="t")
    with pytest.raises(EdgeMoEError, match="tensor t: expected uint8"):
        kernels.QWeight(data, QT.Q8_0, 32, name="t")
    w = kernels.QWeight(data, QT.Q8_0, 64, name="t")
    with pytest.raises(EdgeMoEError, match="tensor t: input of shape"):
        kernels.matmul(w, np.zeros((1, 32), np.float32))
    with pytest.raises(EdgeMoEError, match="row 4 out of range"):
        kernels.dequantize_rows(w, np.array([4]))


def test_numpy_path_scratch_is_bounded(monkeypatch):
    """The numpy path never dequantizes more than one tile of rows at a time."""
    seen = []
    orig = kernels._dequant_tile

    def spy(w, r0, r1):
        t = orig(w, r0, r1)
        seen.append(t.nbytes)
        return t

    monkeypatch.setattr(kernels, "_dequant_tile", spy)
    data, ref = make_weight(QT.Q4_K, 512, 2048)
    w = kernels.QWeight(data, QT.Q4_K, 2048)
    x = np.ones((1, 2048), np.float32)
    np.testing.assert_allclose(kernels._matmul_numpy(w, x), x @ ref.T, rtol=1e-4, atol=1e-4)
    assert len(seen) > 1 and max(seen) <= kernels._TILE_BYTES


def test_import_is_quick_and_compiles_nothing():
    code = (
        "import time; t=time.perf_counter(); import edgemoe.quant.kernels as k; print(time.perf_counter()-t, k.BACKEND)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, name = out.stdout.split()
    assert name in ("ggml", "numpy")
    assert float(seconds) < 3.0


def _import_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    import os

    code = "import edgemoe.quant.kernels as k; print(k.BACKEND)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_missing_library_falls_back_to_numpy(tmp_path):
    out = _import_in_subprocess({"EDGEMOE_GGML_LIB": str(tmp_path), "EDGEMOE_KERNELS": ""})
    assert out.returncode == 0 and out.stdout.strip() == "numpy"
    assert "ggml kernels unavailable" in out.stderr
    forced = _import_in_subprocess({"EDGEMOE_GGML_LIB": str(tmp_path), "EDGEMOE_KERNELS": "ggml"})
    assert forced.returncode != 0 and "EDGEMOE_KERNELS=ggml" in forced.stderr


def test_bad_env_var(monkeypatch):
    monkeypatch.setenv("EDGEMOE_KERNELS", "cuda")
    try:
        with pytest.raises(EdgeMoEError, match="EDGEMOE_KERNELS"):
            importlib.reload(kernels)
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)


@pytest.mark.skipif(
    kernels.BACKEND != "ggml" or kernels._lib.q4_0x8 is None,
    reason="ggml's repacked Q4_0 kernels are not in this build",
)
@pytest.mark.parametrize("T", [1, 3, 4, 5, 9, 32])
def test_repacked_q4_0_gives_the_per_row_result(T):
    """pack() rewrites Q4_0 rows into ggml's block_q4_0x8 layout in place; gemv (T < 4) and
    gemm (groups of 4 rows, the rest by gemv) give what vec_dot per row gives, up to the order
    of float sums; the layout is wrong if a single byte lands elsewhere."""
    n_out, n_in = 136, 512
    data, ref = make_weight(QT.Q4_0, n_out, n_in, seed=11)
    plain = kernels.QWeight(data, QT.Q4_0, n_in)
    packed = kernels.QWeight(data.copy(), QT.Q4_0, n_in)
    assert kernels.can_pack(packed)
    kernels.pack(packed)
    assert packed.packed and not np.array_equal(packed.data, data)
    x = np.random.default_rng(T).standard_normal((T, n_in)).astype(np.float32)
    want = kernels.matmul(plain, x)
    assert rel_err(kernels.matmul(packed, x), want) < 1e-5
    assert rel_err(want, x @ ref.T) < 1e-2
    with pytest.raises(EdgeMoEError, match="repacked"):
        kernels.dequantize_rows(packed, np.array([0]))


def test_pack_leaves_what_it_cannot_take():
    """Read-only bytes (a file mapping), other types and row counts not a multiple of 8 stay as
    they are."""
    data, _ = make_weight(QT.Q4_0, 64, 256)
    ro = data.copy()
    ro.flags.writeable = False
    q8, _ = make_weight(QT.Q8_0, 64, 256)
    odd, _ = make_weight(QT.Q4_0, 60, 256)
    for d, q, _n in ((ro, QT.Q4_0, 64), (q8, QT.Q8_0, 64), (odd, QT.Q4_0, 60)):
        w = kernels.QWeight(d, q, 256)
        before = d.copy()
        assert not kernels.can_pack(w)
        assert not kernels.pack(w).packed
        np.testing.assert_array_equal(w.data, before)
