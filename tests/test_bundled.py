"""The bundled model: it loads in llama.cpp and edgemoe alike, and its card tells the truth."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
from conftest import assert_matches_quantized, llama_cpp_logits

import edgemoe
from edgemoe.api import bundled_model_path
from edgemoe.runtime import evaluate

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "models" / "shakespeare-moe.md"


def test_bundled_model_is_small_and_default():
    path = bundled_model_path()
    assert path.stat().st_size <= 40_000_000
    with edgemoe.load() as m:
        assert m.path == path
        assert m.config.arch == "qwen3moe"
        # the shape people run, scaled down: top-8 of 64 routed experts, K-quant experts (Q4_K_M)
        assert (m.config.n_expert, m.config.n_expert_used) == (64, 8)
        text = m.generate("ROMEO.\n", max_tokens=24, temperature=0.8, seed=1)
    assert len(text.split()) >= 5


def test_bundled_experts_are_llama_cpp_k_quants():
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(bundled_model_path())).tensors}
    experts = {n: t for n, t in types.items() if "_exps" in n}
    assert experts and set(experts.values()) <= {"Q4_K", "Q6_K"}, experts
    assert {t for n, t in experts.items() if "gate" in n or "up_" in n} == {"Q4_K"}


def test_bundled_logits_match_llama_cpp():
    path = bundled_model_path()
    text = (ROOT / "models" / "data" / "validation.txt").read_text(encoding="utf-8")[:3000]
    with edgemoe.load(path, kv_type="f32", n_ctx=256) as m:
        ids = m.tokenize(text)[:200]
        ours = m.logits(ids)
    assert_matches_quantized(ours, llama_cpp_logits(path, ids))


def _card_figure(name: str) -> float:
    m = re.search(rf"\| {re.escape(name)} \| ([0-9.]+)", CARD.read_text(encoding="utf-8"))
    assert m, f"{CARD} has no '{name}' figure (run tools/model_card_figures.py)"
    return float(m.group(1))


def test_validation_perplexity_matches_the_card():
    path = bundled_model_path()
    with edgemoe.load(path, n_ctx=evaluate_window(), kv_type="f32") as m:
        toks = m.tokenize((ROOT / "models" / "data" / "validation.txt").read_text(encoding="utf-8"), add_bos=False)
        got = evaluate.perplexity("edgemoe", m.logits, evaluate.windows_of(toks, evaluate_window())).perplexity
    card = _card_figure("validation perplexity, edgemoe")
    assert abs(got / card - 1) <= 0.01, f"measured {got:.3f}, card says {card:.3f}"


def evaluate_window() -> int:
    return 256
