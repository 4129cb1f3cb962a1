"""Shared fixtures: tiny models built by the tests themselves (edgemoe.testing.synth), llama.cpp as reference."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemoe.runtime import llama_ref
from edgemoe.testing import synth

_BUILT: dict[tuple, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Stores converted on first use (and other cached files) go to a folder of the test session,
    not the user's ~/.cache/edgemoe."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEMOE_CACHE", str(tmp_path_factory.mktemp("edgemoe-cache")))
        yield


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def build_model(models_dir):
    """build_model(arch, ftype="F32", **spec) -> path of a tiny GGUF, built once per session.

    ftype F32/F16/Q8_0/Q4_0/...: written by gguf-py; K-quants and MXFP4_MOE: an F16 file with
    256-wide rows quantized by llama.cpp."""

    def build(arch: str, ftype: str = "F32", **kw) -> Path:
        key = (arch, ftype, tuple(sorted(kw.items())))
        if key in _BUILT:
            return _BUILT[key]
        name = f"{arch}-{ftype}-{abs(hash(key)) % 10**8}.gguf"
        if ftype in synth.WRITE_DTYPES:
            spec = synth.SynthSpec.tiny(arch, dtype=ftype, **kw)
            path = synth.write_model(spec, models_dir / name)
        else:
            src = synth.write_model(synth.SynthSpec.for_quant(arch, **kw), models_dir / f"src-{name}")
            path = models_dir / name
            synth.quantize_model(src, path, ftype)
        _BUILT[key] = path
        return path

    return build


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is no package), loaded once per session."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return sys.modules[name]


def llama_cpp_logits(path: Path | str, ids: list[int], n_ctx: int = 256, kv_type: str = "f32") -> np.ndarray:
    """llama.cpp's logits for every position, KV cache in F32 (exact comparisons) or F16."""
    import llama_cpp

    kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
    llm = llama_ref.llama(
        path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        n_threads=2,
        type_k=kv,
        type_v=kv,
    )
    try:
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_greedy(path: Path | str, ids: list[int], n: int, n_ctx: int = 256) -> list[int]:
    import llama_cpp

    llm = llama_ref.llama(
        path,
        n_ctx=n_ctx,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    try:
        out = []
        for tok in llm.generate([int(t) for t in ids], temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(int(tok))
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


def kl_per_position(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """KL(ref || ours) of the next-token distributions at each position."""
    from edgemoe.runtime.evaluate import kl_divergence

    return kl_divergence(ref, ours)


def assert_matches_quantized(ours: np.ndarray, ref: np.ndarray) -> None:
    """The quantized-file criterion: median KL per position <= 0.01, and the same argmax wherever
    llama.cpp's top-2 gap is not a near-tie (llama.cpp quantizes activations; tiny random models
    flip near-ties)."""
    kl = kl_per_position(ours, ref)
    assert np.median(kl) <= 0.01, f"median KL {np.median(kl):.4f}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * ref.std(axis=-1)
    agree = ours.argmax(-1) == ref.argmax(-1)
    assert agree[clear].all(), f"argmax differs at clear positions {np.nonzero(clear & ~agree)[0].tolist()}"


def random_ids(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab - 3, size=n).tolist()


os.environ.setdefault("EDGEMOE_THREADS", "2")
# llama.cpp's quantizer logs through llama-cpp-python's logger, which prints everything by default
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_store(build_model, tmp_path_factory) -> Path:
    """An expert store of the tiny qwen3moe model, shared read-only: a test that damages a store
    copies it first."""
    from edgemoe.store.convert import convert

    return convert(build_model("qwen3moe"), tmp_path_factory.mktemp("tiny-store") / "tiny.edgemoe", progress=False)


def edgemoe_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """`python -m edgemoe ARGS` as a user runs it: output captured as text, env added to this
    process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "edgemoe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def fixed_cache(m) -> None:
    """The expert cache at the plan's capacity from now on: it no longer borrows what the KV cache
    does not use yet (Budget.lend), so a test can set its capacity or budget and keep it."""
    m._kv.on_write = None
    m._budget.lent = 0
    m._experts.cache.set_capacity(m.memory_plan.cache_capacity)
