"""Source-exact nested planes (edgemoe.quant.native, stores of scheme "native"): every block type
llama.cpp writes for MoE experts comes back bit for bit from its planes, a store at quality max
computes exactly what the GGUF run in place computes, and the lower widths are usable."""

import json

import gguf
import numpy as np
import pytest
from conftest import random_ids

import edgemoe
from edgemoe.quant import native, native_kernels, repack
from edgemoe.quant._ggml import GGMLLib
from edgemoe.store.convert import convert
from edgemoe.store.reader import StoreReader

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def ggml():
    return GGMLLib()


def _matrix(seed: int = 0, n_out: int = 64, n_in: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=(n_out, n_in)) * 0.02).astype(np.float32)


LAYOUTS = list(native.TYPES.values()) + list(native.FOUR_PLANES.values())


@pytest.mark.parametrize("nt", LAYOUTS, ids=[f"{nt.qtype.name}-{nt.n_planes}planes" for nt in LAYOUTS])
def test_planes_give_back_the_source_blocks_bit_for_bit(ggml, nt):
    """llama.cpp's quantizer (ggml_quantize_chunk) writes the blocks; split -> merge is the identity,
    the planes together are exactly as large, and every lower width is nearer the source than the
    width below it."""
    qtype = nt.qtype
    w = _matrix()
    raw = ggml.quantize(int(qtype), w)
    planes = native.split_type(nt, raw, *w.shape)
    assert [p.size for p in planes] == nt.plane_nbytes(*w.shape)
    assert sum(p.size for p in planes) == raw.size
    np.testing.assert_array_equal(native.merge_type(nt, planes, *w.shape), raw)
    src = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    errs = []
    for k in range(1, nt.n_planes + 1):
        blocks = native.merge_type(nt, planes[:k], *w.shape)
        errs.append(np.linalg.norm(gguf.quants.dequantize(blocks, qtype).reshape(w.shape) - src) / np.linalg.norm(src))
    assert errs[-1] == 0 and all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[0] < 0.7, errs  # two bits: coarse, not noise


@pytest.mark.parametrize("nt", LAYOUTS, ids=[f"{nt.qtype.name}-{nt.n_planes}planes" for nt in LAYOUTS])
def test_every_fast_merge_is_the_generic_merge_at_every_width(nt):
    """The kernels written for one layout (Q4_K, 32-weight nibble blocks, Q6_K, Q8_0) give the bytes
    of the generic kernel that follows the layout's program (NativeType.program), at every width,
    on random bytes (every bit pattern of codes and metadata)."""
    qk, bsize = nt.block
    n_out, n_in = 16, 4 * qk if qk < 256 else 512
    raw = np.random.default_rng(7).integers(0, 256, size=(n_out, n_in // qk * bsize), dtype=np.uint8)
    planes = native.split_type(nt, raw, n_out, n_in)
    n = n_out * n_in // qk
    for k in range(1, nt.n_planes + 1):
        views = [p.reshape(n, -1) for p in planes[:k]]
        want = np.empty_like(raw)
        args = (nt.meta[0], nt.meta[1], nt.program, k, *native_kernels.pad(views))
        native_kernels.merge_program(want.reshape(n, bsize), *args)
        np.testing.assert_array_equal(native.merge_type(nt, planes[:k], n_out, n_in), want, err_msg=f"{k} planes")
        if nt is native.TYPES[gguf.GGMLQuantizationType.Q4_K]:  # merged straight into block_q4_Kx8
            flat = want.reshape(-1).copy()
            repack.repack_q4_Kx8(flat, n_out, want.shape[1], np.empty(8 * want.shape[1], np.uint8))
            got = native.merge_q4_kx8_type(nt, planes[:k], n_out, n_in, np.empty_like(raw))
            np.testing.assert_array_equal(got.reshape(-1), flat, err_msg=f"{k} planes, repacked")


def test_a_lower_width_keeps_the_top_bits_and_fills_the_rest_without_bias(ggml):
    """Width 2 of a Q8_0 matrix: every code keeps its top two bits; the filled codes average the
    centres of their bins (no systematic shift of the weights)."""
    w = _matrix(1, 128, 1024)
    raw = ggml.quantize(int(Q.Q8_0), w)
    planes = native.split(Q.Q8_0, raw, *w.shape)
    low = native.merge(Q.Q8_0, planes[:1], *w.shape)
    q = raw.reshape(-1, 34)[:, 2:].view(np.int8).astype(np.int32) + 128
    ql = low.reshape(-1, 34)[:, 2:].view(np.int8).astype(np.int32) + 128
    np.testing.assert_array_equal(ql >> 6, q >> 6)
    assert abs((ql - ((q >> 6) * 64 + 31.5)).mean()) < 0.05


def test_a_short_or_missing_plane_is_an_error_naming_it(ggml):
    raw = ggml.quantize(int(Q.Q4_K), _matrix())
    planes = native.split(Q.Q4_K, raw, 64, 512)
    with pytest.raises(ValueError, match="Q4_K: plane 1 has"):
        native.merge(Q.Q4_K, [planes[0], planes[1][:-1]], 64, 512)
    with pytest.raises(ValueError, match="Q4_K: 4 planes"):
        native.merge(Q.Q4_K, [*planes, planes[2]], 64, 512)


# the file types people download, written by llama.cpp's own quantizer (llama_model_quantize)
STORE_CASES = [
    ("qwen3moe", "Q4_K_M"),  # Q4_K experts, Q6_K down projections in some layers
    ("qwen3moe", "Q5_K_M"),  # Q5_K beside Q6_K: four planes, Q6_K split 2|2|1|1
    ("qwen3moe", "Q6_K"),
    ("qwen3moe", "Q8_0"),
    ("qwen3moe", "Q4_0"),
    ("olmoe", "Q5_1"),
    ("qwen3moe", "Q3_K_L"),  # Q3_K kept whole (one plane) beside nested Q5_K
    ("gpt-oss", "MXFP4_MOE"),
]


@pytest.mark.parametrize("arch,ftype", STORE_CASES, ids=[f"{a}-{f}" for a, f in STORE_CASES])
def test_a_native_store_at_max_is_the_gguf_exactly(build_model, tmp_path, arch, ftype):
    src = build_model(arch, ftype)
    st = convert(src, tmp_path / "n.edgemoe", scheme="native", progress=False)
    r = StoreReader(st)
    try:
        man = json.loads((st / "manifest.json").read_text())
        g = gguf.GGUFReader(src)
        src_experts = sum(int(t.n_bytes) for t in g.tensors if "_exps.weight" in t.name)
        assert r.native and r.all_experts_bytes() == src_experts  # not a byte larger than the source
        types = {t.name: t.tensor_type.name for t in g.tensors}
        assert man["scheme"]["types"][1]["down"] == types["blk.1.ffn_down_exps.weight"]
    finally:
        r.close()
    ids = random_ids(24, 256, seed=3)
    with edgemoe.load(src, kv_type="f32", n_ctx=64) as m:
        ref = m.logits(ids)
    with edgemoe.load(st, kv_type="f32", n_ctx=64) as m:
        np.testing.assert_array_equal(m.logits(ids), ref)
        s = m.stats()
        assert s.lossless and s.cache.backend_rows["ggml"] > 0 and s.cache.backend_rows["edgemoe"] == 0


def test_lower_widths_of_a_native_store_run_and_cost_what_they_say(build_model, tmp_path):
    """At a lower width a native store's experts are merged with their missing bits filled and run
    on the same kernels: the logits move away from max, by less at the wider width."""
    src = build_model("qwen3moe", "Q5_K_M")
    st = convert(src, tmp_path / "n.edgemoe", scheme="native", progress=False)
    ids = random_ids(24, 256, seed=4)
    outs = {}
    for b in (2, 3, 4, 5):
        with edgemoe.load(st, kv_type="f32", n_ctx=64, bits=b) as m:
            outs[b] = m.logits(ids)
            assert set(m.stats().cache.uses_by_bits) == {b}
    d = {b: float(np.abs(outs[b] - outs[5]).mean()) for b in (2, 3, 4)}
    assert d[2] > d[3] > d[4] > 0, d


def test_native_store_info_verify_and_bits_errors(build_model, tmp_path, capsys):
    from edgemoe import cli

    src = build_model("qwen3moe", "Q4_K_M")
    st = convert(src, tmp_path / "n.edgemoe", scheme="native", progress=False)
    assert cli.main(["info", str(st)]) == 0
    out = capsys.readouterr().out
    assert "source types (gate/up/down)" in out and "Q4_K/Q4_K/Q6_K" in out and "Q4_K/Q4_K/Q4_K" in out
    assert cli.main(["verify", str(st)]) == 0
    with pytest.raises(edgemoe.EdgeMoEError, match="--bits: a native store's widths"):
        convert(src, tmp_path / "m.edgemoe", scheme="native", bits=(2, 4), progress=False)
    man = json.loads((st / "manifest.json").read_text())
    man["scheme"]["types"][0]["gate"] = "Q9_X"
    (st / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(edgemoe.EdgeMoEError, match=r"scheme.types\[0\].*unknown GGML type"):
        StoreReader(st)


def test_an_expert_held_at_full_width_serves_a_lower_width_request(build_model, tmp_path):
    """Once merged at full width an expert's planes are gone; asked for at a lower width later
    (quality fast after max), it is computed from the held blocks, not from planes it no longer has."""
    src = build_model("qwen3moe", "Q4_0")
    st = convert(src, tmp_path / "n.edgemoe", scheme="native", progress=False)
    ids = random_ids(16, 256, seed=5)
    with edgemoe.load(st, kv_type="f32", n_ctx=64) as m:
        full = m.logits(ids)
        m.set_quality("fast")
        m.logits(ids)  # runs: the held experts serve the lower widths fast asks for
        held = m.streamed_experts.cache.state().held.values()
        assert any(h.fast for h in held)
        # and the stats say what ran: every computation at the full width, none at 2 or 3 bits
        assert set(m.stats().cache.uses_by_bits) == {4}
        assert m.stats().cache.skipped > 0 and full.shape[0] == len(ids)


@pytest.mark.parametrize("rows", [1, 32])
def test_a_lower_width_runs_on_the_merge_of_its_planes(build_model, tmp_path, rows):
    """A lower width is merged for one use into a buffer the experts keep (gate, up and down side by
    side; repacked only for a batch of rows): the expert's output is that of its planes merged
    into buffers of their own and run by the plain expert FFN, for every expert used twice."""
    from edgemoe.runtime.experts import expert_ffn

    src = build_model("qwen3moe", "Q4_K_M")  # Q4_K gate/up, Q4_K or Q6_K down: both repackable and not
    st = convert(src, tmp_path / "n.edgemoe", scheme="native", progress=False)
    with edgemoe.load(st, kv_type="f32", n_ctx=64, bits=2) as m:
        ex = m.streamed_experts
        reader, rng = ex.reader, np.random.default_rng(rows)
        for layer, e in [(0, 0), (0, 1), (1, 0), (0, 0)]:  # the buffer reused, across layers and types
            sch = reader.schemes[layer]
            bufs = [np.empty(reader.plane_sizes(layer)[0], np.uint8)]
            reader.read_planes(layer, e, 0, bufs)
            x = rng.standard_normal((rows, reader.n_embd)).astype(np.float32)
            got = ex.ffn(layer, e, bufs, x)
            w = {
                mat: edgemoe.quant.kernels.QWeight(
                    sch.blocks(mat, per, *ex.shapes[mat]), sch.types[mat], ex.shapes[mat][1]
                )
                for mat, per in reader.matrix_planes(bufs, layer).items()
            }
            np.testing.assert_allclose(got, expert_ffn(ex.args, w["gate"], w["up"], w["down"], x), rtol=1e-5, atol=1e-6)
