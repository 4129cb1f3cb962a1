"""Nested (matryoshka) bit-plane quantization: edgemoe.quant.nested."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.quant import nested_fit, nested_kernels
from edgemoe.quant.nested import SCHEMES, D2MoE, MatQuant, default_bits
from edgemoe.quant.nested_fit import naive_msb_slices

FAMILIES = [(2, 3, 4), (2, 4, 8)]
SHAPE = (48, 256)  # small: the whole file stays well under a minute


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def w() -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.standard_t(4, size=SHAPE) * 0.03).astype(np.float32)


@pytest.fixture(scope="module")
def act() -> np.ndarray:
    rng = np.random.default_rng(2)
    return np.exp(rng.normal(0, 1.2, SHAPE[1])).astype(np.float32)  # per input column magnitude


@pytest.fixture(scope="module")
def encoded(w):
    """(scheme name, bits) -> (scheme, parts)"""
    out = {}
    for name in SCHEMES:
        for bits in FAMILIES:
            sch = SCHEMES[name](bits)
            out[name, bits] = (sch, sch.encode_parts(w))
    return out


def test_interface():
    assert set(SCHEMES) == {"d2moe", "matquant", "matquant-sym"}
    assert default_bits(4.5) == (2, 3, 4) and default_bits(5) == (2, 3, 4)
    assert default_bits(8.5) == (2, 4, 8) and default_bits(16) == (2, 4, 8)
    d = D2MoE((2, 4, 8))
    assert d.name == "d2moe" and d.widths == (2, 4, 8)
    assert [d.planes_for(b) for b in (2, 4, 8)] == [1, 3, 7]
    assert [D2MoE().planes_for(b) for b in (2, 3, 4)] == [1, 2, 3]
    m = MatQuant((2, 4, 8))
    assert m.name == "matquant" and [m.planes_for(b) for b in (2, 4, 8)] == [1, 2, 3]
    assert m.plane_bits == [2, 2, 4] and MatQuant().plane_bits == [2, 1, 1]
    with pytest.raises(ValueError):
        d.planes_for(3)
    with pytest.raises(ValueError):
        d.plane_nbytes(4, 100)  # n_in not a multiple of the group
    with pytest.raises(ValueError):
        MatQuant((2, 5, 8))  # a 3-bit increment cannot be packed


def test_symmetric_matquant_stores_no_offsets():
    """matquant-sym is matquant with m = -2^(B-1) s implied (a Q4_0 source): plane 0 holds only s,
    half a bit per weight less at group 32, and computes exactly what matquant does."""
    from edgemoe.quant.nested import MatQuantSym

    rng = np.random.default_rng(5)
    a, b = MatQuant((2, 3, 4), 32), MatQuantSym((2, 3, 4), 32)
    n_out, n_in = 16, 128
    q = rng.integers(0, 16, (n_out, n_in))
    s = rng.uniform(0.01, 0.1, (n_out, n_in // 32)).astype(np.float16)
    m = (s.astype(np.float32) * -8).astype(np.float16)
    pa, pb = a.from_codes(q, s, m), b.from_codes(q, s, m)
    assert b.plane_nbytes(n_out, n_in)[0] == a.plane_nbytes(n_out, n_in)[0] - n_out * n_in // 32 * 2
    assert [p.nbytes for p in pb] == b.plane_nbytes(n_out, n_in)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(b.matmul(pb[:k], n_out, n_in, x), a.matmul(pa[:k], n_out, n_in, x))
        np.testing.assert_allclose(
            b.matmul(pb[:k], n_out, n_in, x, backend="numpy"), a.matmul(pa[:k], n_out, n_in, x), rtol=1e-5, atol=1e-5
        )
    qq, ss, mm = b.codes(pb, n_out, n_in)
    assert np.array_equal(qq, q) and np.array_equal(ss, s) and np.array_equal(mm, m)
    with pytest.raises(ValueError, match="offsets"):
        b.from_codes(q, s, s)


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("bits", FAMILIES)
def test_planes_are_self_contained_bytes(encoded, name, bits):
    sch, parts = encoded[name, bits]
    planes = parts["planes"]
    assert len(planes) == sch.n_planes
    assert [p.nbytes for p in planes] == sch.plane_nbytes(*SHAPE)
    for p in planes:
        assert p.dtype == np.uint8 and p.ndim == 1 and p.flags.c_contiguous
    # each plane can be read back from a copy of its bytes alone (no shared buffers)
    copies = [bytearray(p.tobytes()) for p in planes]
    again = [np.frombuffer(c, np.uint8) for c in copies]
    np.testing.assert_array_equal(sch.dequantize(again, *SHAPE), sch.dequantize(planes, *SHAPE))
    with pytest.raises(ValueError):
        sch.dequantize([planes[0][:-2]], *SHAPE)


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("bits", FAMILIES)
def test_error_decreases_with_width(encoded, w, name, bits):
    sch, parts = encoded[name, bits]
    errs = [_rel(sch.dequantize(parts["planes"][: sch.planes_for(b)], *SHAPE), w) for b in bits]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # and every width is close to (or better than) independent RTN at that width; matquant-sym
    # ties the offset to the scale (it exists to hold symmetric sources such as Q4_0 exactly), so
    # on a float matrix it gives up some accuracy against asymmetric RTN
    slack = 1.6 if name == "matquant-sym" else 1.25
    for b, e in zip(bits, errs):
        assert e < slack * _rel(nested_fit.rtn_quantize(w, b), w), (b, e)


@pytest.mark.parametrize("bits", FAMILIES)
def test_nested_property_d2moe(encoded, bits):
    sch, parts = encoded["d2moe", bits]
    for b in bits:
        k = sch.planes_for(b)
        got = sch.dequantize(parts["planes"][:k], *SHAPE)
        want = D2MoE.reconstruct(parts, k, sch.group)  # W^_b1 + sum_{i<k} s_i * (+-1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    # the residual planes really are +-1 with one scale per group
    for sgn in parts["signs"]:
        assert set(np.unique(sgn)) <= {-1.0, 1.0}
    assert parts["q0"].max() <= 3 and parts["q0"].min() >= 0


@pytest.mark.parametrize("bits", FAMILIES)
def test_nested_property_matquant(encoded, bits):
    sch, parts = encoded["matquant", bits]
    q, B = parts["q"], bits[-1]
    assert q.min() >= 0 and q.max() < 2**B
    s = np.repeat(parts["s"].astype(np.float64), sch.group, axis=1)
    m = np.repeat(parts["m"].astype(np.float64), sch.group, axis=1)
    for r in bits:
        k = sch.planes_for(r)
        got = sch.dequantize(parts["planes"][:k], *SHAPE)
        np.testing.assert_allclose(got, sch.reconstruct(parts, k), rtol=0, atol=1e-6 * np.abs(got).max())
        # MatQuant's rounded slice S(q', r) = clamp(round(q'/d), 0, 2^r-1) * d of the code in the
        # half-step-offset domain q' = q - (d-1)/2, read back at the bin centre
        d = 2.0 ** (B - r)
        qs = np.clip(np.round((q - (d - 1) / 2) / d), 0, 2**r - 1) * d
        want = s * (qs + (d - 1) / 2) + m
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("bits", FAMILIES)
@pytest.mark.parametrize("T", [1, 5])
def test_matmul_matches_dequantize(encoded, name, bits, T):
    sch, parts = encoded[name, bits]
    x = np.random.default_rng(T).standard_normal((T, SHAPE[1])).astype(np.float32)
    for b in bits:
        k = sch.planes_for(b)
        want = x @ sch.dequantize(parts["planes"][:k], *SHAPE).T
        got = sch.matmul(parts["planes"][:k], *SHAPE, x)
        assert got.shape == (T, SHAPE[0]) and got.dtype == np.float32
        assert _rel(got, want) < 1e-4, (b, _rel(got, want))
        got_np = sch.matmul(parts["planes"][:k], *SHAPE, x, backend="numpy")
        assert _rel(got_np, want) < 1e-4
    y1 = sch.matmul(parts["planes"][:1], *SHAPE, x[0])  # a vector in, a vector out
    assert y1.shape == (SHAPE[0],)


@pytest.mark.skipif(not nested_kernels.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("name", list(SCHEMES))
def test_numpy_fallback_equals_numba(encoded, name):
    sch, parts = encoded[name, (2, 4, 8)]
    x = np.random.default_rng(9).standard_normal((3, SHAPE[1])).astype(np.float32)
    for b in (2, 4, 8):
        k = sch.planes_for(b)
        a = sch.matmul(parts["planes"][:k], *SHAPE, x, backend="numba")
        c = sch.matmul(parts["planes"][:k], *SHAPE, x, backend="numpy")
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * np.abs(c).max())


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("bits", FAMILIES)
def test_matmul_wide_rows(name, bits):
    """n_in = 1024: the T == 1 kernel decodes inside the multiply-add (every plane's row slots
    hold whole groups); T = 3 uses the decode-then-multiply path on the same planes."""
    rng = np.random.default_rng(11)
    w = (rng.standard_t(4, size=(24, 1024)) * 0.02).astype(np.float32)
    sch = SCHEMES[name](bits)
    planes = sch.encode(w)
    for T in (1, 3):
        x = rng.standard_normal((T, 1024)).astype(np.float32)
        for b in bits:
            k = sch.planes_for(b)
            want = x @ sch.dequantize(planes[:k], 24, 1024).T
            assert _rel(sch.matmul(planes[:k], 24, 1024, x), want) < 1e-4
            assert _rel(sch.matmul(planes[:k], 24, 1024, x, backend="numpy"), want) < 1e-4


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("bits", FAMILIES)
def test_matmul_odd_group(name, bits):
    """group 64 (and shapes with a single group) go through the same kernel."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((7, 64)).astype(np.float32)
    sch = SCHEMES[name](bits, group=64)
    planes = sch.encode(w)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    for b in bits:
        k = sch.planes_for(b)
        want = x @ sch.dequantize(planes[:k], 7, 64).T
        assert _rel(sch.matmul(planes[:k], 7, 64, x), want) < 1e-4


@pytest.mark.parametrize("name", list(SCHEMES))
def test_activation_aware_beats_plain(w, act, name):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((256, SHAPE[1])) * act).astype(np.float32)
    ref = x @ w.T
    sch = SCHEMES[name]((2, 3, 4))
    plain = sch.encode(w)
    aware = sch.encode(w, act_scale=act * np.sqrt(2 / np.pi))  # mean |x| per column
    for b in (2, 3, 4):
        k = sch.planes_for(b)
        e_plain = _rel(x @ sch.dequantize(plain[:k], *SHAPE).T, ref)
        e_aware = _rel(x @ sch.dequantize(aware[:k], *SHAPE).T, ref)
        assert e_aware < e_plain, (b, e_aware, e_plain)


def test_d2moe_4bit_beats_naive_msb_2bit(encoded, w):
    sch, parts = encoded["d2moe", (2, 3, 4)]
    e4 = _rel(sch.dequantize(parts["planes"][:3], *SHAPE), w)
    for mode in ("round", "trunc"):
        e_naive2 = _rel(naive_msb_slices(w, (2,), mode=mode)[2], w)
        assert e4 < 0.4 * e_naive2, (mode, e4, e_naive2)


def test_matquant_beats_naive_slicing_at_2_bits(encoded, w):
    sch, parts = encoded["matquant", (2, 4, 8)]
    e2 = _rel(sch.dequantize(parts["planes"][:1], *SHAPE), w)
    assert e2 < _rel(naive_msb_slices(w, (2,), mode="round")[2], w)
    assert e2 < _rel(naive_msb_slices(w, (2,), mode="trunc")[2], w)


def test_constant_and_zero_groups():
    w = np.zeros((4, 256), np.float32)
    w[1] = 0.5
    w[2, :128] = -3.0
    # not matquant-sym: with its offset tied to the scale a constant group is exact at the top
    # width only (it holds symmetric sources such as Q4_0 exactly, test_symmetric_matquant_...)
    for name in (n for n in SCHEMES if n != "matquant-sym"):
        for bits in FAMILIES:
            sch = SCHEMES[name](bits)
            planes = sch.encode(w)
            for b in bits:
                got = sch.dequantize(planes[: sch.planes_for(b)], *w.shape)
                np.testing.assert_allclose(got, w, atol=2e-3)
