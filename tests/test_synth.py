"""Synthetic MoE GGUF files load in llama.cpp and give finite, spread-out logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import load_tool

from edgemoe.runtime import llama_ref
from edgemoe.testing.synth import ARCHES, SynthSpec, build_vocab, quantize_model, tensor_types, write_model


def _bench_module():
    return load_tool("make_bench_model")


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé jalapeño Zürich",
    "tabs\tand   spaces\n\n  newlines   ",
]


def _logits(path, tokens, n_ctx=64):
    pytest.importorskip("llama_cpp")
    llm = llama_ref.llama(path, logits_all=True, n_ctx=n_ctx, n_threads=2, n_threads_batch=2)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64), llm
    finally:
        llm.close() if hasattr(llm, "close") else None


def _check(scores):
    assert np.isfinite(scores).all()
    std = scores.std(axis=1)
    assert (std >= 2.0).all(), std


# ---- no llama.cpp needed ------------------------------------------------------------------------


def test_vocab_shapes_and_merges():
    tokens, merges, types = build_vocab(288)
    assert len(tokens) == 288 + 3 == len(types)
    assert len(set(tokens)) == len(tokens)
    assert merges and all(len(m.split(" ")) == 2 for m in merges)


@pytest.mark.parametrize("arch", ARCHES)
def test_written_file_metadata(tmp_path, arch):
    spec = SynthSpec.tiny(arch)
    p = write_model(spec, tmp_path / f"{arch}.gguf")
    r = gguf.GGUFReader(str(p))
    names = {t.name: t for t in r.tensors}
    assert names["token_embd.weight"].shape.tolist() == [spec.n_embd, spec.n_vocab]
    assert names["blk.0.ffn_gate_exps.weight"].shape.tolist() == [spec.n_embd, spec.n_ff_exp, spec.n_expert]
    assert names["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert p.stat().st_size < 5e6
    assert not list(tmp_path.glob("*.tmp"))


def test_invalid_specs():
    with pytest.raises(ValueError):
        SynthSpec(arch="olmoe", n_head=4, n_head_kv=2).validate()
    with pytest.raises(ValueError):
        SynthSpec(arch="qwen2moe", tied_output=True).validate()
    with pytest.raises(ValueError):
        SynthSpec(arch="mixtral").validate()


# ---- llama.cpp ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_llama_cpp_loads_and_logits_spread(tmp_path, arch, dtype):
    llama_cpp = pytest.importorskip("llama_cpp")  # noqa: F841
    spec = SynthSpec.tiny(arch, dtype=dtype)
    p = write_model(spec, tmp_path / f"{arch}.gguf")
    rng = np.random.default_rng(1)
    tokens = [spec.bos_id] + rng.integers(0, spec.vocab, 15).tolist()
    scores, _ = _logits(p, tokens)
    _check(scores)


@pytest.mark.parametrize("arch", ["qwen3moe", "phimoe"])
def test_llama_cpp_tokenizes_text(tmp_path, arch):
    llama_cpp = pytest.importorskip("llama_cpp")
    p = write_model(SynthSpec.tiny(arch), tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(p), n_ctx=64, verbose=False, vocab_only=True)
    for text in TEXTS:
        toks = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert llm.detokenize(toks).decode() == text
    assert len(llm.tokenize(b"the the the", add_bos=False)) < len(b"the the the")


@pytest.mark.parametrize(
    "arch,ftype", [("qwen2moe", "Q4_K_M"), ("olmoe", "MXFP4_MOE"), ("phimoe", "Q2_K"), ("granitemoe", "Q6_K")]
)
def test_quantize_reports_real_types(tmp_path, arch, ftype):
    pytest.importorskip("llama_cpp")
    spec = SynthSpec.for_quant(arch)
    src = write_model(spec, tmp_path / "src.gguf")
    types = quantize_model(src, tmp_path / f"{ftype}.gguf", ftype)
    assert types == tensor_types(tmp_path / f"{ftype}.gguf")
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.attn_norm.weight"] == "F32"
    exp = types["blk.0.ffn_down_exps.weight"]
    assert exp == {"Q4_K_M": "Q4_K", "MXFP4_MOE": "MXFP4", "Q2_K": "Q2_K", "Q6_K": "Q6_K"}[ftype] or exp in (
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    ), exp  # K-quant mixes bump some layers
    rng = np.random.default_rng(2)
    tokens = [spec.bos_id] + rng.integers(0, spec.vocab, 11).tolist()
    scores, _ = _logits(tmp_path / f"{ftype}.gguf", tokens)
    _check(scores)


# ---- benchmark-model generator ------------------------------------------------------------------


@pytest.mark.parametrize("qname", ["Q4_0", "Q8_0"])
def test_bench_quant_blocks_have_requested_stats(qname):
    mb = _bench_module()
    qt = gguf.GGMLQuantizationType[qname]
    rng = np.random.default_rng(0)
    data = mb.quant_blocks(rng, (64, 1024), 0.05, qt)
    x = gguf.quants.dequantize(data, qt)
    assert x.shape == (64, 1024)
    assert abs(x.std() / 0.05 - 1) < 0.05
    assert abs(x.mean()) < 0.002


def test_bench_writer_small_shape_runs_in_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    mb = _bench_module()
    shape = mb.BenchShape(n_layer=2, n_embd=256, n_head=4, n_expert=8, n_expert_used=2, n_ff_exp=256, vocab=400)
    p = mb.write_bench_model(shape, tmp_path / "b.gguf", log=lambda *_: None)
    types = tensor_types(p)
    assert types["blk.0.ffn_up_exps.weight"] == "Q4_0"
    assert types["output.weight"] == "Q8_0"
    scores, _ = _logits(p, [400] + list(range(20, 40)))
    _check(scores)


def test_bench_routing_targets_follow_the_trained_model():
    mb = _bench_module()
    layers = [
        dict(reuse=0.40, entropy_vs_uniform=0.80, top1_weight=0.20),
        dict(reuse=0.60, entropy_vs_uniform=0.70, top1_weight=0.30),
    ]
    measured = dict(k=8, n_expert=64, tokens=1000, layers=layers)
    # a model of the trained model's own shape gets its figures back
    same = mb.routing_targets(2, 8, 64, measured)
    assert np.allclose(same.reuse, [0.40, 0.60]) and np.allclose(same.entropy, [0.80, 0.70])
    assert np.allclose(same.top1, [0.20, 0.30])
    # another shape: excess over independent picks, interpolated over depth
    other = mb.routing_targets(3, 2, 8, measured)
    x0 = (0.40 - 8 / 64) / (1 - 8 / 64)
    assert np.isclose(other.reuse[0], 2 / 8 + (1 - 2 / 8) * x0)
    assert other.reuse[0] < other.reuse[1] < other.reuse[2] and np.isclose(other.entropy[1], 0.75)
    assert np.isclose(other.top1[0], 1 / 2 + (1 - 1 / 2) * (0.20 - 1 / 8) / (1 - 1 / 8))
    # the default: the bundled model's own routing, saved by tools/train_default_model.py
    t = mb.routing_targets(16, 8, 64)
    assert "bundled model" in t.source
    for a, low in ((t.reuse, 8 / 64), (t.entropy, 0.3), (t.top1, 1 / 8)):
        assert a.shape == (16,) and np.all((a > low) & (a < 1))


def test_bench_writer_calibration_matches_the_engine(tmp_path):
    """The writer's numpy forward pass (which chose each layer's attention gain) routes its
    calibration tokens as edgemoe's engine does on the written file, and reaches the targets."""
    import edgemoe
    from edgemoe.devices.replay import locality

    mb = _bench_module()
    # the trained model's own top-8 of 64 (the OLMoE benchmark shape), narrow so that it is quick
    shape = mb.BenchShape(n_layer=4, n_embd=256, n_head=4, n_expert=64, n_expert_used=8, n_ff_exp=128, vocab=400)
    p = mb.write_bench_model(shape, tmp_path / "c.gguf", seed=3, log=lambda *_: None)
    r = gguf.GGUFReader(str(p))
    field = lambda k: [float(r.fields[k].parts[i][0]) for i in r.fields[k].data]  # noqa: E731
    target, reached, gains = (
        field("edgemoe.devices.bench." + k) for k in ("reuse_target", "reuse_calibrated", "attn_gain")
    )
    for t, got, g in zip(target, reached, gains):
        if mb.GAIN_RANGE[0] + 1e-6 < g < mb.GAIN_RANGE[1] - 1e-6:  # not held at a bound
            assert abs(got - t) < 0.02
    # popularity (router-row skew) and concentration (router scale) meet theirs where not at a bound
    skews, scales = field("edgemoe.devices.bench.router_skew"), field("edgemoe.devices.bench.router_scale")
    for key, knobs, bounds, tol in (
        ("entropy", skews, (0.0, mb.SKEW_MAX), 0.05),  # fitted before the gain, which moves it a little
        ("top1", scales, mb.SCALE_RANGE, 0.01),
    ):
        targets, got = field(f"edgemoe.devices.bench.{key}_target"), field(f"edgemoe.devices.bench.{key}_calibrated")
        fitted = [(t, g) for t, g, k in zip(targets, got, knobs) if bounds[0] + 1e-6 < k < bounds[1] - 1e-6]
        assert fitted, (key, knobs)
        for t, g in fitted:
            assert abs(g - t) < tol, (key, t, g)
    # `edgemoe bench` names what the file was calibrated to, each figure's target beside what it reached
    from edgemoe.devices.bench import model_bytes
    from edgemoe.devices.bench_report import _calibration

    line = _calibration(model_bytes(p))
    assert "bundled model" in line
    for label, key in (("reuse", "reuse"), ("popularity entropy", "entropy"), ("first expert's share", "top1")):
        t, got = field(f"edgemoe.devices.bench.{key}_target"), field(f"edgemoe.devices.bench.{key}_calibrated")
        assert f"{label}" in line and f"{np.mean(t):.1%} / {np.mean(got):.1%}" in line, (label, line)
    ids = mb.Calibration(shape, seed=3).ids
    with edgemoe.load(p) as m:
        traces = [m.routing_trace(list(seq)) for seq in ids]
    engine = locality(traces, shape.n_expert)["reuse_per_layer"]
    assert np.allclose(engine, reached, atol=0.02), (engine, reached)


def test_bench_writer_gpt_oss_shape_runs_in_both_engines_as_calibrated(tmp_path):
    """A small gpt-oss bench file (MXFP4 experts written as blocks, sinks, biases, yarn): llama.cpp
    reads it and gives finite, spread logits; edgemoe in place gives llama.cpp's next tokens; and
    the engine routes the calibration tokens with the reuse the writer's gpt-oss forward pass
    reached (so the gpt-oss calibration computes what the file holds)."""
    import edgemoe
    from edgemoe.devices.replay import locality

    mb = _bench_module()
    go = mb._gpt_oss()
    shape = go.GptOssShape(
        n_layer=3, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=32, n_expert_used=4, n_ff_exp=256, vocab=400
    )
    p = mb.write_bench_model(shape, tmp_path / "g.gguf", mb.Q.MXFP4, seed=2, log=lambda *_: None)
    types = tensor_types(p)
    assert types["blk.0.ffn_up_exps.weight"] == "MXFP4" and types["blk.0.attn_q.weight"] == "Q8_0"
    tokens = [400] + list(range(20, 44))
    scores, _ = _logits(p, tokens)
    assert np.isfinite(scores).all() and (scores.std(axis=1) > 0.5).all()
    with edgemoe.load(p, kv_type="f32", n_ctx=64) as m:
        ours = m.logits(tokens)
        assert (ours.argmax(-1) == scores.argmax(-1)).mean() >= 0.9
        r = gguf.GGUFReader(str(p))
        reached = [
            float(r.fields["edgemoe.devices.bench.reuse_calibrated"].parts[i][0])
            for i in r.fields["edgemoe.devices.bench.reuse_calibrated"].data
        ]
        traces = [m.routing_trace(list(seq)) for seq in mb.Calibration(shape, seed=2).ids]
    engine = locality(traces, shape.n_expert)["reuse_per_layer"]
    assert np.allclose(engine, reached, atol=0.03), (engine, reached)
