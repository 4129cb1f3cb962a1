"""Activation-aware conversion's calibration (`edgemoe convert --calibration TEXT`): it observes the
routing through the engine's observer hook (not by patching the Engine class for the whole
process), and the down projection's input it records is the model's own expert activation, biases
included (gpt-oss: the clamped SwiGLU variant; it used to be plain SiLU without biases)."""

from __future__ import annotations

import numpy as np

from edgemoe.models.config import ModelArgs
from edgemoe.models.gguf_file import GGUFFile
from edgemoe.models.tokenizer import open_tokenizer
from edgemoe.runtime.engine import Engine
from edgemoe.runtime.kvcache import KVCache
from edgemoe.store import convert

TEXT = "ROMEO. What light through yonder window breaks? It is the east, and Juliet is the sun. " * 3


def _oai(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """gpt-oss's activation, written out: x = min(g, 7), y = clip(u, -7, 7), x sigmoid(1.702 x) (y + 1)."""
    x, y = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
    return x / (1.0 + np.exp(-1.702 * x)) * (y + 1.0)


def test_calibration_records_the_models_own_expert_activation(build_model):
    src = build_model("gpt-oss")
    stats = convert.calibrate_activations(src, TEXT, max_tokens=24)

    gf = GGUFFile(src)
    args = ModelArgs.from_gguf(gf)
    eng = Engine(gf, args)
    seen = {}
    eng.observe = lambda i, h, top, w: seen.setdefault(i, (h.copy(), top.copy()))
    ids = open_tokenizer(src, None, args.n_vocab, gf.metadata).tokenize(TEXT)[:24]
    eng.forward(np.asarray(ids), KVCache(args, len(ids)), all_logits=False)
    assert Engine.experts is Engine.__dict__["experts"]  # the class is untouched

    checked = 0
    for i, (h, top) in seen.items():
        assert np.allclose(stats[(i, "in")], np.abs(h).mean(0), rtol=1e-5)
        t = {w: gf.tensor(f"blk.{i}.ffn_{w}_exps.{kind}") for w in ("gate", "up") for kind in ("weight",)}
        b = {w: gf.tensor(f"blk.{i}.ffn_{w}_exps.bias") for w in ("gate", "up")}
        for e in np.unique(top)[:3]:
            x = h[(top == e).any(axis=1)].astype(np.float64)
            g = x @ np.asarray(t["gate"].data[e], dtype=np.float64).T + b["gate"].data[e]
            u = x @ np.asarray(t["up"].data[e], dtype=np.float64).T + b["up"].data[e]
            want = np.abs(_oai(g, u)).mean(0)
            np.testing.assert_allclose(stats[(i, int(e))], want, rtol=1e-4, atol=1e-6)
            silu = np.abs(g / (1 + np.exp(-g)) * u).mean(0)  # what the old calibration recorded (with biases)
            assert np.abs(silu - want).max() > 1e-3 * want.max()  # so the check tells them apart
            checked += 1
    assert checked >= 3
