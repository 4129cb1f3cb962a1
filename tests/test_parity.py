"""edgemoe's logits against llama.cpp's on tiny models of every supported architecture."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_matches_quantized, llama_cpp_greedy, llama_cpp_logits, random_ids

import edgemoe
from edgemoe.runtime import engine
from edgemoe.testing import synth

pytest.importorskip("llama_cpp")

ARCHS = list(synth.ARCHES)
N_TOKENS = 40


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / ref.std())


def ours_logits(path, ids, **kw) -> np.ndarray:
    with edgemoe.load(path, kv_type="f32", n_ctx=256, **kw) as m:
        return m.logits(ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_llama_cpp(build_model, arch):
    path = build_model(arch)
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        ids = random_ids(N_TOKENS, m.config.n_vocab)
        ours = m.logits(ids)
    ref = llama_cpp_logits(path, ids)
    assert ours.shape == ref.shape == (N_TOKENS, ref.shape[1])
    assert ours.dtype == np.float32
    assert ref.std() >= 2.0, "test model too flat to be a meaningful comparison"
    assert rel_err(ours, ref) <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_greedy_continuation_matches(build_model, arch):
    path = build_model(arch)
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        prompt = random_ids(8, m.config.n_vocab, seed=1)
        ours = [r.token for r in m.stream(prompt, max_tokens=32, temperature=0, ignore_eos=True)]
    assert ours == llama_cpp_greedy(path, prompt, 32)


def check_quantized(path, expect_type: str) -> None:
    types = set(synth.tensor_types(path).values())
    assert expect_type in types, f"llama.cpp wrote {types}, not {expect_type}"
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        ids = random_ids(N_TOKENS, m.config.n_vocab, seed=2)
        ours = m.logits(ids)
    assert_matches_quantized(ours, llama_cpp_logits(path, ids))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ftype", ["F16", "Q8_0", "Q4_K_M"])
def test_quantized_every_arch(build_model, arch, ftype):
    expect = {"Q4_K_M": "Q4_K"}.get(ftype, ftype)
    check_quantized(build_model(arch, ftype), expect)


@pytest.mark.parametrize(
    "ftype,expect",
    [
        ("BF16", "BF16"),
        ("Q4_0", "Q4_0"),
        ("Q4_1", "Q4_1"),
        ("Q5_0", "Q5_0"),
        ("Q5_1", "Q5_1"),
        ("Q2_K", "Q2_K"),
        ("Q3_K_M", "Q3_K"),
        ("Q5_K_M", "Q5_K"),
        ("Q6_K", "Q6_K"),
        ("MXFP4_MOE", "MXFP4"),
        ("IQ4_NL", "IQ4_NL"),
    ],
)
def test_quantized_types(build_model, ftype, expect):
    if ftype in synth.WRITE_DTYPES:
        path = build_model("qwen3moe", ftype, n_embd=256, n_ff_exp=256)
    else:
        path = build_model("qwen3moe", ftype)
    check_quantized(path, expect)


# ---- the comparison can fail ----------------------------------------------------------------


def test_broken_rope_fails_the_comparison(build_model, monkeypatch):
    path = build_model("qwen3moe")
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        ids = random_ids(N_TOKENS, m.config.n_vocab)
        monkeypatch.setattr(engine.Engine, "_apply_rope", lambda self, layer, x, pos, n_ctx: x)
        broken = m.logits(ids)
    assert rel_err(broken, llama_cpp_logits(path, ids)) > 1e-2


@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe"])
def test_wrong_topk_normalisation_fails_the_comparison(build_model, monkeypatch, arch):
    path = build_model(arch)
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        ids = random_ids(N_TOKENS, m.config.n_vocab)
        cfg = m._engine.args
        import dataclasses

        m._engine.args = dataclasses.replace(cfg, norm_topk=not cfg.norm_topk)
        broken = m.logits(ids)
    assert rel_err(broken, llama_cpp_logits(path, ids)) > 1e-2


# ---- tokenizer ------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, Ångström, Zürich — déjà vu!",
    "  leading   spaces,\ttabs\t\tand\n\nnewlines   \n  trailing  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_matches_llama_cpp(build_model, text):
    import llama_cpp

    path = build_model("qwen3moe")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        ref = llm.tokenize(text.encode(), add_bos=True)
        ref_nobos = llm.tokenize(text.encode(), add_bos=False)
    finally:
        llm.close()
    with edgemoe.load(path) as m:
        assert m.tokenize(text) == ref
        assert m.tokenize(text, add_bos=False) == ref_nobos
        assert m.detokenize(ref_nobos) == text


@pytest.mark.parametrize(
    "arch,scaling",
    [("llama", "linear"), ("qwen3moe", "yarn"), ("granitemoe", "linear"), ("olmoe", "yarn")],
)
def test_rope_scaling_matches_llama_cpp(build_model, arch, scaling):
    kv = (
        (f"{arch}.rope.scaling.type", scaling),
        (f"{arch}.rope.scaling.factor", 4.0),
        (f"{arch}.rope.scaling.original_context_length", 128),
    )
    path = build_model(arch, extra_kv=kv)
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        assert m.config.rope_scaling == scaling
        ids = random_ids(N_TOKENS, m.config.n_vocab, seed=3)
        ours = m.logits(ids)
    assert rel_err(ours, llama_cpp_logits(path, ids)) <= 1e-3


def test_long_prompt_crosses_batch_and_span_boundaries(build_model):
    """Prompts run layer by layer in spans of N_SPAN tokens, attention N_BATCH queries at a time;
    results must not change across either boundary."""
    from edgemoe.runtime.engine import N_BATCH, N_SPAN

    path = build_model("qwen2moe")
    n = N_SPAN + 2 * N_BATCH + 21
    with edgemoe.load(path, kv_type="f32", n_ctx=1024) as m:
        ids = random_ids(n, m.config.n_vocab, seed=9)
        ours = m.logits(ids)
    assert rel_err(ours, llama_cpp_logits(path, ids, n_ctx=1024)) <= 1e-3
